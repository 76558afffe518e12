"""README's reasons table lists every reason the code can emit, and nothing else."""

from __future__ import annotations

import re

from tests.conftest import ROOT

#: Where a reason is made: record.fail/skip(...), DecodeError(...), HeaderError(...), and the
#: (reason, detail) tuples that header functions return.
_MADE = re.compile(
    r'(?:\.fail|\.skip|DecodeError|HeaderError)\(\s*f?"([a-z_]+(?::[a-z_]*)?)'
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
    text = (ROOT / "README.md").read_text()
    table = text[text.index("### Reasons") : text.index("### Broken and hostile files")]
    rows = [line.split("|")[2] for line in table.splitlines() if line.startswith("| ")][1:]
    tokens = {token for row in rows for token in re.findall(r"`([^`]+)`", row)}
    return {t.split(":")[0] + (":" if ":" in t else "") for t in tokens}


def test_readme_lists_every_reason_and_nothing_else() -> None:
    code, readme = _code_reasons(), _readme_reasons()
    assert code - readme == set(), "reasons the code emits that README does not list"
    assert readme - code == set(), "reasons README lists that the code never emits"


def test_readme_lists_every_labels_reason() -> None:
    """README's table of `batchscan labels` reasons is the code's list, with the code's labels."""
    from batchscan.site.report_labels import REASONS

    text = (ROOT / "README.md").read_text()
    table = text[
        text.index("| reason | label | the report") : text.index("How a report is decided")
    ]
    rows = [line.split("|") for line in table.splitlines()[2:] if line.startswith("| `")]
    readme = {row[1].strip().strip("`"): row[2].strip() for row in rows}
    assert list(readme) == list(REASONS)
    assert set(readme.values()) == {"pneumonia", "normal", "uncertain"}
