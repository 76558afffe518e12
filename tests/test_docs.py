"""The documentation says what the code does: the troubleshooting page lists every reason
the code can emit and nothing else, the labels page the labeler's reasons, the reports page
every column of every report file; README is a front door whose links lead somewhere."""

from __future__ import annotations

import re

from tests.conftest import ROOT

#: Where a reason is made: record.fail/skip(...), DecodeError(...), HeaderError(...),
#: FetchError(...) (a PACS instance that could not be fetched: a failed row), and the
#: (reason, detail) tuples that header functions return.
_MADE = re.compile(
    r'(?:\.fail|\.skip|DecodeError|HeaderError|FetchError)\(\s*f?"([a-z_]+(?::[a-z_]*)?)'
    r'|return\s+\(?\s*f?"([a-z_]+(?::[a-z_]*)?)",'
    r'|reason = "([a-z_]+)" if .* else "([a-z_]+)"'
    r"|(DUPLICATE_PREFIX)"
)


def _code_reasons() -> set[str]:
    found: set[str] = set()
    for path in (ROOT / "batchscan").rglob("*.py"):
        for match in _MADE.finditer(path.read_text()):
            found.update(group for group in match.groups() if group)
    found.discard("DUPLICATE_PREFIX")
    found.discard("unknown")  # header.view_of returns ("unknown", None): a view, not a reason
    found.add("duplicate_of:")
    # the failure kinds of the worker pool and the decode-error mapping
    found |= {"worker_crash", "timeout", "truncated_pixel_data", "decode_error:"}
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
