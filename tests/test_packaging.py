"""The README commands, .ci/run and the Dockerfile install the same way pyproject says."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from common.venvs import LOCKED_INSTALL, locked_versions, normalized
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```(?:sh|bash)\n(.*?)```", text, flags=re.S)


#: The lock files (requirements/lock.sh) and the extras each one holds besides the package.
LOCKS = {"prod": (), "ci": ("test", "ray", "docs"), "gpu": ("gpu",)}


def _locked(name: str) -> dict[str, str]:
    """The pins of ``requirements/<name>.txt`` (each with its hashes), which lock.sh wrote."""
    lock = ROOT / "requirements" / f"{name}.txt"
    assert "bash requirements/lock.sh" in lock.read_text().splitlines()[1], f"{name}.txt"
    return locked_versions(lock)


def test_ci_runs_exactly_readmes_test_command() -> None:
    ci_lines = [
        line
        for line in (ROOT / ".ci/run").read_text().splitlines()
        if line and not line.startswith(("#", "set ", "cd "))
    ]
    assert len(ci_lines) == 1
    assert any(ci_lines[0] in block for block in _readme_commands())
    assert LOCKED_INSTALL.format(lock="ci") in ci_lines[0]
    assert "pytest" in ci_lines[0] and "mkdocs build --strict" in ci_lines[0]


def test_readme_first_command_installs_the_lock_and_runs_the_demo() -> None:
    first = _readme_commands()[0]
    assert LOCKED_INSTALL.format(lock="prod") in first
    assert "batchscan demo" in first and "batchscan scan" in first


def test_each_lock_pins_what_pyproject_asks_for_at_an_allowed_version() -> None:
    """Every requirement of the package, of the lock's extras and of the build backend is
    pinned (with hashes) at a version its specifier allows, and the package's own
    requirements are at the same version in every lock (ci and gpu are resolved within
    prod's pins): CI tests what production and a GPU run. A pyproject edit without
    ``bash requirements/lock.sh`` fails here."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = data["project"]
    locks = {name: _locked(name) for name in LOCKS}
    for name, extras in LOCKS.items():
        wanted = [*project["dependencies"], *data["build-system"]["requires"]]
        wanted += [r for extra in extras for r in project["optional-dependencies"][extra]]
        for text in wanted:
            requirement = Requirement(text)
            pinned = locks[name].get(normalized(requirement.name))
            assert pinned is not None, f"{name}.txt lacks {requirement.name}"
            assert requirement.specifier.contains(pinned, prereleases=True), (
                f"{name}.txt pins {requirement.name} {pinned}, pyproject asks {requirement}"
            )
        shared = {k: v for k, v in locks[name].items() if k in locks["prod"]}
        assert shared == {k: locks["prod"][k] for k in shared}, f"{name}.txt departs from prod"
    tools = _locked("tools")
    for text in data["dependency-groups"]["tools"]:
        requirement = Requirement(text)
        assert requirement.specifier.contains(tools[normalized(requirement.name)])


def test_dockerfile_matches_pyproject() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    docker = (ROOT / "Dockerfile").read_text()
    base = re.search(r"^FROM python:(\d+\.\d+)", docker, flags=re.M)
    assert base is not None
    minimum = re.search(r">=\s*(\d+\.\d+)", project["requires-python"]).group(1)
    assert tuple(map(int, base.group(1).split("."))) >= tuple(map(int, minimum.split(".")))
    installs = re.findall(r"pip install '\.\[([a-z,]+)\]'", docker)
    assert installs, "the image installs the project with pip install '.[extra]'"
    for extra in installs[0].split(","):
        assert extra in project["optional-dependencies"]
    assert 'ENTRYPOINT ["batchscan"]' in docker and "batchscan" in project["scripts"]
    assert re.search(r"^USER (?!root)\w+", docker, flags=re.M), "runs as a non-root user"
    assert ":ro" in docker, "documents the archive mounted read-only"
    for copied in re.findall(r"^COPY (.+) \./", docker, flags=re.M):
        for name in copied.split():
            assert (ROOT / name).exists(), name


def test_model_ships_as_package_data() -> None:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert {"*.keras", "*.json", "*.npz"} <= set(data["package-data"]["batchscan.models"])
    assert (ROOT / "batchscan" / "models" / "pneumonia_cnn_seed.ood.npz").is_file()
    assert (ROOT / "batchscan" / "models" / "__init__.py").is_file()


def test_the_version_changes_with_each_release() -> None:
    """pyproject's version is the CHANGELOG's newest entry and what the installed package
    says (--version, manifest.json and runs.parquet take it from there)."""
    from batchscan import __version__

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    newest = re.search(r"^## (\d+\.\d+\.\d+)", (ROOT / "CHANGELOG.md").read_text(), re.M)
    assert newest is not None and newest.group(1) == project["version"]
    assert __version__ == project["version"], "reinstall: the package says another version"


def test_kuberay_example_has_token_auth_and_a_read_only_archive() -> None:
    yaml = __import__("pytest").importorskip("yaml")
    cluster = yaml.safe_load((ROOT / "jobs/deploy/kuberay/raycluster.yaml").read_text())
    assert cluster["kind"] == "RayCluster"
    groups = [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]
    for group in groups:
        container = group["template"]["spec"]["containers"][0]
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token" and "RAY_AUTH_TOKEN" in env
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert mounts["/archive"]["readOnly"] is True
    assert cluster["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
