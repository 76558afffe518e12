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
from typing import Any

from batchscan.engines.pipeline import ScanConfig
from batchscan.ingest.preprocess import INPUT_VERSION
from batchscan.ingest.sanity import BLANK_RULE
from batchscan.results.state import RowKeys
from batchscan.scoring.model import ModelCard

#: Version of what a stored file row holds, part of the header key: raised when a release
#: adds or changes columns or how header facts are read, so that rows stored by an older
#: release are read again rather than reported half-empty (3: domain, OOD, device columns
#: and ISO study dates; 4: JPEG 2000 bands, batchscan.ingest.sampling; 5: the fallback window keeps
#: pixel padding in its sample, the blank-image rule batchscan-blank-v1; 6: the five row
#: keys and the model-input store). What changes an input is versioned on its own
#: (:data:`batchscan.ingest.preprocess.INPUT_VERSION`).
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


def header_key(config: ScanConfig) -> str:
    """The key of the header facts `config`'s stages give: the row format, the header
    options and (by an HMAC of it, never the key) the pseudonym key."""
    key_id = (
        hmac.new(config.pseudonym_key, b"batchscan key id", hashlib.sha256).hexdigest()[:16]
        if config.pseudonym_key is not None
        else None
    )
    return _digest(
        {
            "rows": ROW_FORMAT,
            "all_modalities": config.all_modalities,
            "max_pixel_bytes": config.max_pixel_bytes,
            "pseudonym_key": key_id,
        }
    )


def input_key(config: ScanConfig) -> str:
    """The key of the model inputs `config`'s stages make: the declared input version, the
    decode resolution and the blank rule."""
    return _digest(
        {
            "input": INPUT_VERSION,
            "min_edge": config.min_edge,
            "blank_rule": BLANK_RULE if config.blank_gate else None,
        }
    )
