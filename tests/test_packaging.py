"""The README commands, .ci/run and the Dockerfile install the same way pyproject says."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from common.venvs import LOCKED_INSTALL, locked_versions, normalized
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```(?:sh|bash)\n(.*?)```", text, flags=re.S)


#: The lock files (requirements/lock.sh) and the extras each one holds besides the package.
LOCKS = {"prod": (), "ci": ("test", "ray", "docs"), "gpu": ("gpu",), "ray": ("ray",)}


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


def test_dockerfile_installs_the_lock_as_readme_does() -> None:
    """The image: a base with a Python pyproject allows, the lock of its EXTRAS (prod, or
    gpu for the GPU image) with hashes, the package alone, the SBOM, a non-root user."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    docker = (ROOT / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE=python:(\d+\.\d+)", docker, flags=re.M)
    assert base is not None and re.search(r"^FROM \$\{BASE\}$", docker, flags=re.M)
    minimum = re.search(r">=\s*(\d+\.\d+)", project["requires-python"]).group(1)
    assert tuple(map(int, base.group(1).split("."))) >= tuple(map(int, minimum.split(".")))
    lock, package = LOCKED_INSTALL.split(" && ")
    assert lock.replace("requirements/{lock}.txt", '"requirements/${EXTRAS:-prod}.txt"') in docker
    assert re.search(r"^ARG EXTRAS=\"\"$", docker, flags=re.M) and "gpu" in LOCKS
    assert "gpu" in project["optional-dependencies"]
    assert package in docker and "requirements/tools.txt" in docker
    assert (
        "cyclonedx-py environment" in docker and "/usr/share/doc/batchscan/sbom.cdx.json" in docker
    )
    assert 'ENTRYPOINT ["batchscan"]' in docker and "batchscan" in project["scripts"]
    assert re.search(r"^USER (?!root)\w+", docker, flags=re.M), "runs as a non-root user"
    assert ":ro" in docker, "documents the archive mounted read-only"
    joined = re.sub(r"\\\n\s*", " ", docker)  # continued lines as one
    copied = [n for c in re.findall(r"^COPY (.+) \./", joined, flags=re.M) for n in c.split()]
    image_locks = {f"requirements/{n}.txt" for n in (*LOCKS, "tools") if n != "ci"}
    assert image_locks <= set(copied), "every lock EXTRAS can name is in the build"
    for name in copied:
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
    assert cluster["spec"]["rayVersion"] == _locked("ray")["ray"], "the image's Ray release"


def test_kubernetes_cronjob_runs_the_image_non_root_with_a_read_only_archive() -> None:
    """The CronJob of docs/nightly.md: the Dockerfile's user, the archive mounted read-only,
    reports on a claim the file defines, no second run at once, and arguments the scan
    takes."""
    yaml = __import__("pytest").importorskip("yaml")
    from batchscan.cli import build_parser

    documents = list(yaml.safe_load_all((ROOT / "jobs/deploy/kubernetes/cronjob.yaml").read_text()))
    cron = next(d for d in documents if d["kind"] == "CronJob")
    claims = {d["metadata"]["name"] for d in documents if d["kind"] == "PersistentVolumeClaim"}
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    uid = re.search(r"useradd .*--uid (\d+)", (ROOT / "Dockerfile").read_text()).group(1)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == int(uid) != 0
    container = pod["containers"][0]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    args = build_parser().parse_args(container["args"])
    assert args.command == "scan"
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    archive = mounts[str(args.archive)]
    assert archive["readOnly"] is True
    source = volumes[archive["name"]]
    assert any(kind.get("readOnly") is True for kind in source.values() if isinstance(kind, dict))
    reports = volumes[mounts[str(args.out)]["name"]]
    assert reports["persistentVolumeClaim"]["claimName"] in claims
    if container["securityContext"].get("readOnlyRootFilesystem"):
        assert "emptyDir" in volumes[mounts["/tmp"]["name"]], "a writable /tmp"


def test_the_changelog_says_what_the_current_reread_costs() -> None:
    """The release that raised the row format or the input version to today's numbers says
    so, with the cost of the re-read at a million files: a release that raises either
    without a word here fails."""
    from batchscan.ingest.preprocess import INPUT_VERSION
    from batchscan.results.keys import ROW_FORMAT

    text = (ROOT / "CHANGELOG.md").read_text()
    releases = [" ".join(part.replace("*", "").split()) for part in re.split(r"\n## ", text)[1:]]
    for said in (f"row format {ROW_FORMAT}", f"input version {INPUT_VERSION}"):
        release = next((r for r in reversed(releases) if said in r), None)
        assert release is not None, f"CHANGELOG.md never says {said!r}"
        assert "a million files" in release, f"the release of {said} says no cost"


def test_version_verbose_prints_the_versions_a_run_records(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``batchscan --version --verbose``: the release, then what manifest.json's ``versions``
    and runs.parquet's version columns hold (one function makes all three), then the
    device."""
    from batchscan import __version__, versions
    from batchscan.cli import main

    assert main(["--version", "--verbose"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"batchscan {__version__}"
    printed = dict(line.split(" ", 1) for line in lines[1:-1])
    assert printed == {k: v or "not installed" for k, v in versions().items()}
    assert lines[-1].startswith(("device CPU (", "device GPU ("))
