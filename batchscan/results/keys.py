"""The keys of what makes a file row: which stored rows and inputs a run may keep.

A stored row is only as good as what made it. :func:`row_keys` names that in five parts
(:class:`batchscan.results.state.RowKeys`), so that a run reads a file again only when its header
facts or its model input would change, and otherwise rescores the stored input
(:mod:`batchscan.scoring.rescore`). :func:`input_key` alone is what the model-input store
(:mod:`batchscan.scoring.input_store`) keys entries by; ``batchscan train`` takes inputs from a
scan's store only under the key its own stages would give.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from functools import partial
from typing import Any, Final

from batchscan.engines.pipeline import ScanConfig
from batchscan.ingest.preprocess import INPUT_VERSION
from batchscan.ingest.sanity import BLANK_RULE
from batchscan.results.state import RowKeys, StateStore
from batchscan.scoring.model import ModelCard

#: Version of what a stored file row holds, part of the header key: raised when a release
#: adds or changes columns or how header facts are read, so that rows stored by an older
#: release are read again rather than reported half-empty (3: domain, OOD, device columns
#: and ISO study dates; 4: JPEG 2000 bands, batchscan.ingest.sampling; 5: the fallback window keeps
#: pixel padding in its sample, the blank-image rule batchscan-blank-v1; 6: the five row
#: keys, the model-input store, photometric and pixel spacing). What changes an input is
#: versioned on its own (:data:`batchscan.ingest.preprocess.INPUT_VERSION`).
ROW_FORMAT = 6


def _digest(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def row_keys(config: ScanConfig, checked: ModelCard, shadow: ModelCard | None = None) -> RowKeys:
    """The five keys of what makes a file row under this configuration, model and shadow
    model (:class:`batchscan.results.state.RowKeys`): a stored row under other header or input keys
    is read again; one under another domain, model or shadow key is judged and scored
    again from its stored input. The code version is in none of them: a release reads the
    archive again only when it raises :data:`ROW_FORMAT` or
    :data:`batchscan.ingest.preprocess.INPUT_VERSION`."""
    domain = {"domain": checked.card.get("domain"), "out_of_domain": config.out_of_domain}
    model = {"model": checked.version, "ood": (checked.card.get("ood") or {}).get("sha256")}
    return RowKeys(
        header=header_key(config),
        input=input_key(config),
        domain=f"{config.out_of_domain}-{_digest(domain)}",
        model=_digest(model),
        shadow=_digest({"shadow": shadow.version if shadow is not None else None}),
    )


def header_key(config: ScanConfig, row_format: int | None = None) -> str:
    """The key of the header facts `config`'s stages give: the row format (this release's,
    or another one to recognize its rows), the header options and (by an HMAC of it, never
    the key) the pseudonym key."""
    key_id = (
        hmac.new(config.pseudonym_key, b"batchscan key id", hashlib.sha256).hexdigest()[:16]
        if config.pseudonym_key is not None
        else None
    )
    return _digest(
        {
            "rows": ROW_FORMAT if row_format is None else row_format,
            "all_modalities": config.all_modalities,
            "max_pixel_bytes": config.max_pixel_bytes,
            "pseudonym_key": key_id,
        }
    )


def input_key(config: ScanConfig, input_version: int | None = None) -> str:
    """The key of the model inputs `config`'s stages make: the declared input version (this
    release's, or another one to recognize its rows), the decode resolution and the blank
    rule."""
    return _digest(
        {
            "input": INPUT_VERSION if input_version is None else input_version,
            "min_edge": config.min_edge,
            "blank_rule": BLANK_RULE if config.blank_gate else None,
        }
    )


#: Where the cost of reading an archive again is written down for each release.
UPGRADE_NOTES: Final = "CHANGELOG.md"
#: What else changes the header key and the input key than a release.
_HEADER_OPTIONS: Final = (
    "other header options (--all-modalities, --max-pixel-bytes, the pseudonym key)"
)
_INPUT_OPTIONS: Final = "other decode options (--full-resolution, the blank rule)"


def reread_notice(state: StateStore, config: ScanConfig) -> str | None:
    """The one line a scan logs before it reads files again because their stored rows were
    made under other header or input keys, or None: why (a release that raised
    :data:`ROW_FORMAT` or :data:`~batchscan.ingest.preprocess.INPUT_VERSION`, recognized by the
    keys an older number gives, or other header or decode options), how many files and
    about how long at the fastest rate this state has seen.

    The stored keys are the ``row_keys`` of the runs since the last complete one (all rows
    carry a complete run's keys), or, in a state no run recorded them in, one file row's:
    never a pass over the whole table, which would cost a nightly run seconds a million
    files."""
    runs = state.run_rows()
    complete = [i for i, outcome in enumerate(runs["outcome"]) if outcome == "ok"]
    since = complete[-1] if complete else 0
    made = {k for k in runs["row_keys"][since:] if k} or {state.any_row_keys()} - {None}
    causes = sorted({cause for keys in made for cause in _changed(keys, config)})
    if not causes:
        return None
    files = runs["files_found"][complete[-1]] if complete else None
    rates = [
        r
        for r, o in zip(runs["images_per_second"], runs["outcome"], strict=True)
        if r and o == "ok"
    ]
    cost = (
        f"; about {files / max(rates) / 3600:.1f} h at the {max(rates):.0f} images/s of this "
        "state's fastest run"
        if files and rates
        else ""
    )
    what = f"the {files:,} files of the last complete run" if files else "every stored file"
    return (
        f"reading {what} again: their rows were made under {' and '.join(causes)}{cost} "
        f"({UPGRADE_NOTES} gives a release's cost at a million files)"
    )


def _changed(stored: str, config: ScanConfig) -> list[str]:
    """What differs between the `stored` keys of a row and `config`'s header and input keys,
    in words; empty when neither does (the row is read again for no release or option)."""
    parts = stored.split(".")
    if len(parts) != 5:  # one settings key: the releases before the five row keys
        return [f"row format 5 or older (this release's is {ROW_FORMAT})"]
    why = []
    for stored_key, key, current, name, options in (
        (parts[0], partial(header_key, config), ROW_FORMAT, "row format", _HEADER_OPTIONS),
        (parts[1], partial(input_key, config), INPUT_VERSION, "input version", _INPUT_OPTIONS),
    ):
        if stored_key != key():
            # numbers up to 10 past this release's too: a state a newer release wrote
            other = [n for n in range(1, current + 10) if key(n) == stored_key]
            why.append(f"{name} {other[0]} (this release's is {current})" if other else options)
    return why
