"""The documentation says what the code does: the troubleshooting page lists every reason
the code can emit and nothing else, the labels page the labeler's reasons, the reports page
every column of every report file; README is a front door whose links lead somewhere."""

from __future__ import annotations

import ast
import re

from tests.conftest import ROOT

#: Where a reason is made from a literal: record.fail/skip(...), DecodeError(...),
#: HeaderError(...), FetchError(...) (a PACS instance that could not be fetched: a failed
#: row), and the (reason, detail) tuples that header functions return.
_MADE = re.compile(
    r'(?:\.fail|\.skip|DecodeError|HeaderError|FetchError)\(\s*f?"([a-z_]+(?::[a-z_]*)?)'
    r'|return\s+\(?\s*f?"([a-z_]+(?::[a-z_]*)?)",'
    r'|reason = "([a-z_]+)" if .* else "([a-z_]+)"'
)
#: A reason a module declares once (``NAME: Final = "reason"``) ...
_DECLARED = re.compile(r'^([A-Z][A-Z0-9_]*): Final = "([a-z_]+:?)"$', re.MULTILINE)
#: ... counts where it is made: given to one of these calls, returned by a ``*_reason``
#: function (alone or opening an f-string), or prefixed to a detail (not to a SQL pattern).
_MAKERS = {"fail", "skip", "_retire", "DecodeError", "HeaderError", "FetchError"}


def _made_from_declared(tree: ast.AST, declared: dict[str, str]) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(tree):
        values: list[ast.expr] = []
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            values = list(node.args) if name in _MAKERS else []
        elif isinstance(node, ast.FunctionDef) and node.name.endswith("_reason"):
            values = [r.value for r in ast.walk(node) if isinstance(r, ast.Return) and r.value]
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            values = [] if isinstance(node.right, ast.Constant) else [node.left]
        for value in values:
            if isinstance(value, ast.JoinedStr) and value.values:
                first = value.values[0]
                value = first.value if isinstance(first, ast.FormattedValue) else first
            if isinstance(value, ast.Name) and value.id in declared:
                found.add(declared[value.id])
    return found


def _code_reasons() -> set[str]:
    """Every reason the code makes, found where it is made: a reason still declared but no
    longer made is not found, and the troubleshooting test fails."""
    found: set[str] = set()
    for path in (ROOT / "batchscan").rglob("*.py"):
        text = path.read_text()
        for match in _MADE.finditer(text):
            found.update(group for group in match.groups() if group)
        found |= _made_from_declared(ast.parse(text), dict(_DECLARED.findall(text)))
    found.discard("unknown")  # header.view_of returns ("unknown", None): a view, not a reason
    return {reason.split(":")[0] + (":" if ":" in reason else "") for reason in found}


def _readme_reasons() -> set[str]:
    text = (ROOT / "docs" / "troubleshooting.md").read_text()
    text = text[: text.index("## Other problems")]
    rows = [line.split("|")[2] for line in text.splitlines() if line.startswith("| ")][1:]
    tokens = {token for row in rows for token in re.findall(r"`([^`]+)`", row)}
    return {t.split(":")[0] + (":" if ":" in t else "") for t in tokens}


def test_troubleshooting_lists_every_reason_and_nothing_else() -> None:
    code, readme = _code_reasons(), _readme_reasons()
    assert code - readme == set(), "reasons the code emits that the page does not list"
    assert readme - code == set(), "reasons the page lists that the code never emits"


def test_the_labels_page_lists_every_labels_reason() -> None:
    """The labels page's table of reasons is the code's list, with the code's labels."""
    from batchscan.site.report_labels import REASONS

    text = (ROOT / "docs" / "site" / "labels.md").read_text()
    table = text[
        text.index("| reason | label | the report") : text.index("How a report is decided")
    ]
    rows = [line.split("|") for line in table.splitlines()[2:] if line.startswith("| `")]
    readme = {row[1].strip().strip("`"): row[2].strip() for row in rows}
    assert list(readme) == list(REASONS)
    assert set(readme.values()) == {"pneumonia", "normal", "uncertain"}


def test_the_reports_page_says_what_every_column_is() -> None:
    """Each report file's paragraph on the reports page names every column of its schema."""
    from batchscan.results import report

    text = (ROOT / "docs" / "reports.md").read_text()
    text = (
        text[: text.index("## report.html")] + text[text.index("### Watching") :]
        if ("### Watching" in text)
        else text[: text.index("## report.html")]
    )
    described = set(re.findall(r"`([a-z_]+)`", text))
    for name in ("IMAGES", "STUDIES", "RUNS"):
        columns = set(getattr(report, f"{name}_SCHEMA").names)
        assert columns - described == set(), f"{name.lower()} columns the page does not describe"


def test_readme_is_a_front_door_whose_links_lead_somewhere() -> None:
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 220, "README is a front door; the documentation says the rest"
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    assert links, "README links into the documentation"
    for link in links:
        if not link.startswith(("http:", "https:")):
            assert (ROOT / link).exists(), f"README links to a missing {link}"


def test_jobs_readme_names_every_script() -> None:
    """``ls jobs/`` with its README says what each script is for: every script and helper
    has its line there, and the page names no script that is gone."""
    jobs = ROOT / "jobs"
    scripts = {str(p.relative_to(jobs)) for p in jobs.rglob("*.py") if p.name != "__init__.py"}
    text = (jobs / "README.md").read_text()
    rows = [line.split("|")[1] for line in text.splitlines() if line.startswith("| `")]
    named = {name for row in rows for name in re.findall(r"`([a-z0-9_/]+\.py)`", row)}
    assert scripts == named


#: The pages, the shipped model cards and the code whose words name files and modules.
_NAMING = ("docs/**/*.md", "README.md", "jobs/README.md", "batchscan/**/*.py",
           "batchscan/models/*.json", "jobs/**/*.py")  # fmt: skip
_PATH = re.compile(r"(?<![\w/.-])((?:batchscan|jobs|tests|docs)/[\w./-]*\w)")
_MODULE = re.compile(r"(?<![\w/.-])(batchscan(?:\.\w+)+)")
#: A file named like a module (``batchscan.service``) is not one.
_FILE_SUFFIXES = {"toml", "service", "timer", "json", "keras", "npz", "sqlite", "log"}


def _resolves(dotted: str) -> bool:
    """Whether `dotted` is a batchscan module, or an attribute of one."""
    import importlib

    parts = dotted.split(".")
    for at in range(len(parts), 0, -1):
        try:
            found: object = importlib.import_module(".".join(parts[:at]))
        except ImportError:
            continue
        for name in parts[at:]:
            if not hasattr(found, name):
                return False
            found = getattr(found, name)
        return True
    return False


def test_every_file_and_module_the_docs_and_the_card_name_exists() -> None:
    """A path (``batchscan/site/report_rules.toml``, ``jobs/deploy/...``) or a module
    (``batchscan.ingest.preprocess``) named by a page, the shipped card or a docstring is
    there: a move or a rename that leaves its old name in the words fails here."""
    missing = set()
    for pattern in _NAMING:
        for source in ROOT.glob(pattern):
            text = source.read_text(encoding="utf-8")
            for path in _PATH.findall(text):
                if not re.search(r"[A-Z]{3,}|\*", path) and not (ROOT / path).exists():
                    missing.add(f"{source.relative_to(ROOT)}: {path}")
            for dotted in _MODULE.findall(text):
                if dotted.rsplit(".", 1)[-1] not in _FILE_SUFFIXES and not _resolves(dotted):
                    missing.add(f"{source.relative_to(ROOT)}: {dotted}")
    assert not missing, sorted(missing)


def test_the_model_page_states_the_cards_contract() -> None:
    """The keys a card must hold, as the code requires them."""
    from batchscan.scoring.model import REQUIRED_CARD_KEYS

    text = (ROOT / "docs" / "model.md").read_text()
    section = text[text.index("# The model file and its card") : text.index("# Limits")]
    required = section[section.index("lacks one of the keys") :].split(";")[0]
    assert re.findall(r"`(\w+)`", required) == list(REQUIRED_CARD_KEYS)


def test_systemd_runs_the_same_night_as_cron(tmp_path) -> None:
    """docs/nightly.md offers cron or a systemd timer: both run the one wrapper (scan, then
    send when the config names a PACS) with the same config, log folder and batchscan, and
    systemd takes the unit as valid (where systemd-analyze is installed)."""
    import shlex
    import shutil
    import subprocess

    deploy = ROOT / "jobs" / "deploy"
    cron = (deploy / "cron" / "crontab.example").read_text()
    unit = (deploy / "systemd" / "batchscan.service").read_text()
    cron_line = next(line for line in cron.splitlines() if re.match(r"[\d*]", line))
    cron_argv = shlex.split(cron_line)[5:]
    exec_start = re.search(r"^ExecStart=(.+)$", unit, re.MULTILINE)
    assert exec_start is not None
    unit_argv = shlex.split(exec_start.group(1))
    assert unit_argv == cron_argv and unit_argv[0].endswith("deploy/cron/batchscan-nightly.sh")
    cron_env = re.search(r"^BATCHSCAN=(.+)$", cron, re.MULTILINE)
    unit_env = re.search(r"^Environment=BATCHSCAN=(.+)$", unit, re.MULTILINE)
    assert cron_env and unit_env and cron_env.group(1) == unit_env.group(1)
    assert "Nice=" not in unit, "the wrapper sets the priority, as under cron"
    if shutil.which("systemd-analyze") is None:
        return
    wrapper = str(deploy / "cron" / "batchscan-nightly.sh")
    (tmp_path / "batchscan.service").write_text(unit.replace(unit_argv[0], wrapper))
    shutil.copy(deploy / "systemd" / "batchscan.timer", tmp_path)
    done = subprocess.run(
        ["systemd-analyze", "verify", *(str(tmp_path / n) for n in ("batchscan.service",
                                                                     "batchscan.timer"))],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
