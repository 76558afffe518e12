"""MkDocs hook: the parts of the documentation that the code is the truth of, made from the
code at every build, so that they cannot drift from it.

* ``<!-- cli -->``: the help of ``batchscan`` and of each subcommand, from
  :func:`batchscan.cli.build_parser` (the parser the command itself uses), and for each its
  options' config keys, environment variables and defaults and its exit codes, from the
  table the parser is made from (:data:`batchscan.options.COMMANDS`);
* ``<!-- config-keys -->``: every key of the config file, with its option and commands;
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
    from batchscan.options import COMMANDS

    parser = build_parser()
    parts = ["```text", parser.format_help().rstrip(), "```"]
    for action in parser._actions:  # argparse keeps the subparsers here only
        if isinstance(action, argparse._SubParsersAction):
            for command in COMMANDS:
                help_text = action.choices[command.name].format_help().rstrip()
                parts += [f"## batchscan {command.name}", "", "```text", help_text, "```", ""]
                parts += [*_option_table(command), "", *_exit_table(command), ""]
    return "\n".join(parts)


def _option_table(command: Any) -> list[str]:
    config = command.reads_config
    rows = ["| option | default | config key | environment |", "|---|---|---|---|"]
    for option in command.options:
        key = f"`{option.key}`" if option.key else f"none: {option.no_config}"
        rows.append(
            f"| `{option.usage_name}` | {option.shown_default() or ''} | "
            f"{key if config else ''} | {f'`{option.env}`' if option.env else ''} |"
        )
    if not config:
        rows.append("")
        rows.append(f"`batchscan {command.name}` reads no config file.")
    return rows


def _exit_table(command: Any) -> list[str]:
    rows = ["| exit status | meaning |", "|---|---|"]
    return rows + [f"| {code} | {meaning} |" for code, meaning in sorted(command.exits.items())]


def _config_keys() -> str:
    from batchscan.options import COMMANDS, config_keys

    rows = ["| key | option | read by | default |", "|---|---|---|---|"]
    for key, option in config_keys().items():
        readers = [c.name for c in COMMANDS if c.reads_config and key in {o.key for o in c.options}]
        rows.append(
            f"| `{key}` | `{option.usage_name}` | {', '.join(readers)} | "
            f"{option.shown_default() or ''} |"
        )
    return "\n".join(rows)


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
        if kind == "config-keys":
            return _config_keys()
        if kind == "columns" and argument:
            return _columns(argument)
        raise ValueError(f"{page.file.src_path}: unknown generated part {match.group(0)}")

    return _MARKER.sub(made, markdown)


_ROLE = re.compile(r":(?:class|func|mod|data|meth|attr|exc|obj):(?=<code>)")


def on_page_content(html: str, **_: Any) -> str:
    """The docstrings are written for Sphinx as much as for people: drop the reST role
    prefixes (``:func:`` before a name set as code) that Markdown leaves in the text."""
    return _ROLE.sub("", html)
