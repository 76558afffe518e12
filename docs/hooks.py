"""MkDocs hook: the parts of the documentation that the code is the truth of, made from the
code at every build, so that they cannot drift from it.

* ``<!-- cli -->``: the help of ``batchscan`` and of each subcommand, from
  :func:`batchscan.cli.build_parser` (the parser the command itself uses);
* ``<!-- columns:NAME -->``: the columns of a report file (name, Arrow type, whether it can
  be null) from its schema in :mod:`batchscan.results.report`;

A marker the hook does not know fails the build.
"""

from __future__ import annotations

import argparse
import re
from typing import Any

_MARKER = re.compile(r"<!-- ([a-z-]+)(?::([a-z_]+))? -->")


def _cli() -> str:
    from batchscan.cli import build_parser

    parser = build_parser()
    parts = ["```text", parser.format_help().rstrip(), "```"]
    for action in parser._actions:  # argparse keeps the subparsers here only
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                parts += [f"## batchscan {name}", "", "```text", sub.format_help().rstrip(), "```"]
    return "\n".join(parts)


def _columns(name: str) -> str:
    from batchscan.results import report

    schema = getattr(report, f"{name.upper()}_SCHEMA")
    rows = ["| column | type | can be null |", "|---|---|---|"]
    rows += [f"| `{f.name}` | {f.type} | {'yes' if f.nullable else 'no'} |" for f in schema]
    return "\n".join(rows)


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    """Replace each marker of `markdown` by what the code says."""

    def made(match: re.Match[str]) -> str:
        kind, argument = match.group(1), match.group(2)
        if kind == "cli":
            return _cli()
        if kind == "columns" and argument:
            return _columns(argument)
        raise ValueError(f"{page.file.src_path}: unknown generated part {match.group(0)}")

    return _MARKER.sub(made, markdown)


_ROLE = re.compile(r":(?:class|func|mod|data|meth|attr|exc|obj):(?=<code>)")


def on_page_content(html: str, **_: Any) -> str:
    """The docstrings are written for Sphinx as much as for people: drop the reST role
    prefixes (``:func:`` before a name set as code) that Markdown leaves in the text."""
    return _ROLE.sub("", html)
