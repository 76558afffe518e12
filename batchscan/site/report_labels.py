"""Labels from radiology reports: ``batchscan labels REPORTS --out LABELS.csv``.

A hospital has no labels file, but it has the radiology report of every study, exportable from
its RIS as accession number + text. This stage turns each report into ``pneumonia``,
``normal`` or ``uncertain`` with a short reason, so that ``batchscan evaluate`` and
``batchscan train`` can run on a site's own studies. It is a rule-based labeler in the
tradition of NegEx, NegBio and the CheXpert labeler, which made the large chest X-ray label
sets of the field from reports: find each mention of a finding, then decide whether it is
asserted, negated, uncertain, resolved or historical.

What is ours here is only the rules, kept as data in ``report_rules.toml``: the finding words,
the section headers, and the phrases around a finding. The language work is spaCy's
(tokenizer, sentence splitter, entity ruler with fuzzy matching for typos) and negspacy's
(one NegEx instance per modifier: negated, uncertain, resolved, historical, question,
other cause). medspaCy (ConText, sectionizer) would fit too but pins spaCy < 3.8 and so
numpy < 2, which breaks the decoders of the scan; negspacy runs on today's spaCy and numpy.

How a report is decided (:func:`decide`):

1. Sections. Indication, history, comparison, technique and the like are not evidence (they
   ask or recall; "INDICATION: r/o pneumonia" labels nothing). The impression decides when
   it mentions a finding, or says "normal" in so many words; else the findings (or the
   body of a report without headers) decide.
2. Within the deciding text, pneumonia-specific words (pneumonia, bronchopneumonia,
   pneumonitis, pna, infection) outrank airspace words (consolidation, infiltrate, airspace
   disease or opacity), which outrank a bare opacity: "consolidation ... no pneumonia" is
   normal, "no consolidation; possible pneumonia" uncertain.
3. A mention asserted (also "likely", "consistent with", "concerning for") is ``pneumonia``;
   hedged ("may represent", "cannot exclude", "possible", "versus atelectasis") is
   ``uncertain``; negated, resolved ("has cleared") or historical ("history of") is
   ``normal``. An airspace finding asserted with no pneumonia word is ``pneumonia`` with
   reason ``airspace`` (``--airspace uncertain`` makes it uncertain), and ``uncertain`` when
   it is in the findings and an impression does not carry it; explained by another cause
   ("opacity, likely atelectasis") it is ``normal`` with reason ``other_cause``. A bare
   opacity asserted is ``uncertain`` (reason ``opacity``).
4. No mention at all: ``normal`` (``no_mention``, or ``indication_only`` when only the
   indication or a question names the finding). Nothing to read: ``uncertain``
   (``empty_report``).

Report text is private: it is read, labelled and dropped. Only the audit file (opt-in) keeps
the sentences that decided each label; nothing of it reaches an error message or a log.
"""

from __future__ import annotations

import csv
import io
import json
import re
import sys
import tomllib
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Final, Literal

from batchscan.storage import files

KEYS: Final = ("accession_number", "study_instance_uid")
DEFAULT_TEXT_COLUMN: Final = "report"
LABELS: Final = ("pneumonia", "normal", "uncertain")
#: Every reason a label can carry, in the order the labels page's table lists them
#: (docs/site/labels.md).
REASONS: Final = (
    "positive",
    "airspace",
    "uncertain",
    "opacity",
    "negated",
    "resolved",
    "historical",
    "other_cause",
    "normal_impression",
    "indication_only",
    "no_mention",
    "empty_report",
    "too_long",
)
#: Modifier precedence on one mention: the first flag set wins; none set is "positive".
MENTION_ORDER: Final = (
    "question",
    "negated",
    "resolved",
    "historical",
    "uncertain",
    "other_cause",
)
CONCEPTS: Final = ("specific", "airspace", "opacity")
#: Reports longer than this are not read (no radiograph report comes near; a runaway export
#: field would make the parser's cost and memory unbounded).
MAX_REPORT_CHARS: Final = 200_000
_NORMAL_REASONS: Final = ("negated", "resolved", "historical", "other_cause")
AirspacePolicy = Literal["pneumonia", "uncertain"]


class ReportsError(ValueError):
    """A reports file that cannot be used as a whole (exit 2); the message names the line and
    the problem, never the report text."""


# ------------------------------------------------------------------------------------------
# Rules
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rules:
    """The labeler's rules, as read from ``report_rules.toml`` (see that file).

    Attributes
    ----------
    sections:
        Header name (lower case) -> role: ``exclude``, ``findings`` or ``impression``.
    concepts:
        Concept (``specific``, ``airspace``, ``opacity``) -> (exact terms, fuzzy words).
    modifiers:
        Modifier name -> its negspacy termset plus ``applies_to``.
    impression_normal:
        Compiled patterns of an impression that says "normal".
    """

    sections: dict[str, str]
    concepts: dict[str, tuple[list[str], list[str]]]
    modifiers: dict[str, dict[str, list[str]]]
    impression_normal: tuple[re.Pattern[str], ...]


def load_rules(path: Path | None = None) -> Rules:
    """Read a rules file (default: the one shipped in the package).

    Raises
    ------
    ReportsError
        The file is missing, not TOML, or lacks a section the labeler needs.
    """
    try:
        if path is None:
            rules = resources.files("batchscan.site").joinpath("report_rules.toml")
            text = rules.read_text("utf-8")
        else:
            text = path.read_text(encoding="utf-8")
        data = tomllib.loads(text)
        sections = {
            name.lower(): role
            for role in ("exclude", "findings", "impression")
            for name in data["sections"][role]
        }
        concepts = {
            name: (list(data["concepts"][name]["terms"]), list(data["concepts"][name]["fuzzy"]))
            for name in CONCEPTS
        }
        modifiers = {name: dict(data["modifiers"][name]) for name in MENTION_ORDER}
        normal = tuple(re.compile(p) for p in data["impression_normal"]["patterns"])
    except (OSError, tomllib.TOMLDecodeError, KeyError, TypeError, re.error) as exc:
        raise ReportsError(f"unusable rules file {path or 'report_rules.toml'}: {exc}") from None
    return Rules(sections, concepts, modifiers, normal)


# ------------------------------------------------------------------------------------------
# Sections and segments (plain text, before spaCy)
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Segment:
    """A stretch of one report that spaCy reads as one document.

    ``role`` is ``exclude`` (indication, history...), ``body`` (findings, or text outside any
    header) or ``impression``.
    """

    role: str
    text: str


def _header_pattern(rules: Rules) -> re.Pattern[str]:
    names = sorted(rules.sections, key=len, reverse=True)
    alternatives = "|".join(re.escape(n).replace(r"\ ", r"\s+") for n in names)
    # A header is a name followed by a colon (anywhere, not inside a word), or a name alone
    # on its line ("IMPRESSION" above a numbered list).
    return re.compile(
        rf"(?<![\w/-])(?P<a>{alternatives})[ \t]*:|^[ \t]*(?P<b>{alternatives})[ \t]*$",
        re.IGNORECASE | re.MULTILINE,
    )


#: Where a report's text breaks into separate statements even without a full stop: a blank
#: line, a list item, or a new line that starts with a capital or a digit (a line that starts
#: in lower case is a wrapped sentence and is joined).
_BREAK: Final = re.compile(r"\n[ \t]*\n|\n(?=[ \t]*(?:[-*\u2022]|\d{1,2}[.)]|[A-Z0-9]))")
_SPACE: Final = re.compile(r"\s+")


def split_sections(text: str, rules: Rules, header: re.Pattern[str]) -> list[Segment]:
    """The report cut at its headers and line structure into segments with their role."""
    pieces: list[tuple[str, str]] = []
    role, start = "body", 0
    for match in header.finditer(text):
        pieces.append((role, text[start : match.start()]))
        name = _SPACE.sub(" ", (match.group("a") or match.group("b")).lower())
        found = rules.sections[name]
        role = "body" if found == "findings" else found
        start = match.end()
    pieces.append((role, text[start:]))
    segments = []
    for piece_role, piece in pieces:
        for part in _BREAK.split(piece):
            flat = _SPACE.sub(" ", part).strip()
            if flat:
                segments.append(Segment(piece_role, flat))
    return segments


# ------------------------------------------------------------------------------------------
# The spaCy pipeline
# ------------------------------------------------------------------------------------------


def _register_modifier_factory() -> str:
    """Register (once) negspacy's NegEx with one correction, and return the factory name.

    negspacy 1.1 drops a trigger that starts right after a pseudo phrase: its overlap test
    compares the trigger's start with the pseudo's exclusive end inclusively, so in "prior
    study showed pneumonia" the pseudo "prior study" hides "showed". Here a trigger is
    dropped only when it starts inside the pseudo phrase.
    """
    from negspacy.negation import Negex
    from spacy.language import Language

    name = "batchscan_negex"
    if name in Language.factories:
        return name

    class _Negex(Negex):  # type: ignore[misc]
        def process_negations(self, doc: Any) -> tuple[list[Any], list[Any], list[Any]]:
            kinds: dict[str, list[Any]] = {"Preceding": [], "Following": [], "Termination": []}
            matches = self.matcher(doc)
            strings = self.nlp.vocab.strings
            pseudo = [(s, e) for m, s, e in matches if strings[m] == "pseudo"]
            for match_id, start, end in matches:
                kind = strings[match_id]
                if kind in kinds and not any(s <= start < e for s, e in pseudo):
                    kinds[kind].append((match_id, start, end))
            return kinds["Preceding"], kinds["Following"], kinds["Termination"]

    Language.factory(
        name,
        default_config={
            "neg_termset": {},
            "ent_types": None,
            "extension_name": "negex",
            "chunk_prefix": None,
            "span_keys": None,
        },
    )(_Negex)
    return name


def build_pipeline(rules: Rules) -> Any:
    """A blank English spaCy pipeline: sentence splitter, the concept entity ruler, and one
    negspacy NegEx instance per modifier (its flag is ``span._.<modifier>``).

    No statistical model is loaded: nothing is downloaded, and the result depends on the rules
    alone (the same report gets the same label on every machine).
    """
    import spacy

    factory = _register_modifier_factory()
    nlp = spacy.blank("en")
    # "?" is not a sentence end here: "?pneumonia" is a question about the finding.
    nlp.add_pipe("sentencizer", config={"punct_chars": [".", "!", ";"]})
    ruler = nlp.add_pipe("entity_ruler", config={"phrase_matcher_attr": "LOWER"})
    patterns: list[dict[str, Any]] = []
    for concept, (terms, fuzzy) in rules.concepts.items():
        label = concept.upper()
        patterns += [{"label": label, "pattern": term} for term in terms]
        patterns += [{"label": label, "pattern": [{"LOWER": {"FUZZY2": w}}]} for w in fuzzy]
    ruler.add_patterns(patterns)
    for name in MENTION_ORDER:
        spec = rules.modifiers[name]
        nlp.add_pipe(
            factory,
            name=name,
            config={
                "neg_termset": {
                    "pseudo_negations": spec["pseudo"],
                    "preceding_negations": spec["preceding"],
                    "following_negations": spec["following"],
                    "termination": spec["termination"],
                },
                "ent_types": [c.upper() for c in spec["applies_to"]],
                "extension_name": name,
            },
        )
    return nlp


@dataclass(frozen=True, slots=True)
class Mention:
    """One finding word in a report: its concept, what the words around it say of it
    (``positive`` or a modifier name), the role of its section, and its sentence."""

    concept: str
    status: str
    role: str
    sentence: str


def mentions(doc: Any, role: str) -> list[Mention]:
    """The mentions of one parsed segment."""
    found = []
    for ent in doc.ents:
        status = next((m for m in MENTION_ORDER if ent._.get(m)), "positive")
        found.append(Mention(ent.label_.lower(), status, role, ent.sent.text))
    return found


# ------------------------------------------------------------------------------------------
# Deciding
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Decision:
    """The label of one report, its reason, and the sentences it rests on (audit only)."""

    label: str
    reason: str
    evidence: tuple[str, ...] = ()


def _evidence(chosen: Iterable[Mention]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(m.sentence for m in chosen))


def decide_mentions(found: Sequence[Mention], airspace: AirspacePolicy) -> Decision | None:
    """The label that one stretch of evidence (impression, or findings) gives, or None when it
    names no finding (questions do not count). Specific words outrank airspace words, which
    outrank a bare opacity."""
    by: dict[tuple[str, str], list[Mention]] = {}
    for m in found:
        if m.status != "question":
            by.setdefault((m.concept, m.status), []).append(m)

    def normal_from(concept: str) -> Decision | None:
        for reason in _NORMAL_REASONS:
            if (concept, reason) in by:
                return Decision("normal", reason, _evidence(by[(concept, reason)]))
        return None

    if ("specific", "positive") in by:
        return Decision("pneumonia", "positive", _evidence(by[("specific", "positive")]))
    if ("specific", "uncertain") in by:
        return Decision("uncertain", "uncertain", _evidence(by[("specific", "uncertain")]))
    if any(concept == "specific" for concept, _ in by):
        return normal_from("specific")
    if ("airspace", "positive") in by:
        label = "pneumonia" if airspace == "pneumonia" else "uncertain"
        return Decision(label, "airspace", _evidence(by[("airspace", "positive")]))
    if ("airspace", "uncertain") in by:
        return Decision("uncertain", "uncertain", _evidence(by[("airspace", "uncertain")]))
    if ("opacity", "positive") in by:
        return Decision("uncertain", "opacity", _evidence(by[("opacity", "positive")]))
    if ("opacity", "uncertain") in by:
        return Decision("uncertain", "uncertain", _evidence(by[("opacity", "uncertain")]))
    return normal_from("airspace") or normal_from("opacity")


def impression_says_normal(segments: Sequence[Segment], rules: Rules) -> str | None:
    """The impression's sentence that says "normal" in so many words, if one does."""
    for seg in segments:
        if seg.role == "impression":
            lowered = seg.text.lower()
            if any(p.search(lowered) for p in rules.impression_normal):
                return seg.text
    return None


def decide(
    segments: Sequence[Segment],
    found: Sequence[Mention],
    rules: Rules,
    airspace: AirspacePolicy = "pneumonia",
) -> Decision:
    """A report's label from its segments and mentions (module docstring, steps 1-4)."""
    if not any(seg.role != "exclude" for seg in segments):
        return Decision("uncertain", "empty_report")
    # A question in the impression is the reader's doubt, not an indication.
    impression = [
        Mention(m.concept, "uncertain", m.role, m.sentence) if m.status == "question" else m
        for m in found
        if m.role == "impression"
    ]
    decision = decide_mentions(impression, airspace)
    if decision is not None:
        return decision
    normal = impression_says_normal(segments, rules)
    if normal is not None:
        return Decision("normal", "normal_impression", (normal,))
    has_impression = any(seg.role == "impression" for seg in segments)
    # An airspace finding that the impression leaves out was not the reader's conclusion
    # ("airspace disease, likely atelectasis ... IMPRESSION: atelectasis"): not pneumonia.
    decision = decide_mentions(
        [m for m in found if m.role == "body"], "uncertain" if has_impression else airspace
    )
    if decision is not None:
        return decision
    asked = [m for m in found if m.role == "exclude" or m.status == "question"]
    if asked:
        return Decision("normal", "indication_only", _evidence(asked))
    return Decision("normal", "no_mention")


class ReportLabeler:
    """Labels report texts with the rules (loaded once; the spaCy pipeline built once).

    Parameters
    ----------
    rules:
        The rules (default: the shipped ``report_rules.toml``).
    airspace:
        What an airspace finding asserted without a pneumonia word is: ``pneumonia``
        (default) or ``uncertain``.
    """

    def __init__(self, rules: Rules | None = None, airspace: AirspacePolicy = "pneumonia"):
        self.rules = rules or load_rules()
        self.airspace = airspace
        self._header = _header_pattern(self.rules)
        self.nlp = build_pipeline(self.rules)

    def segments(self, text: str) -> list[Segment]:
        """The report cut into its sections' segments (what spaCy reads)."""
        return split_sections(text, self.rules, self._header)

    def label(self, text: str | None) -> Decision:
        """The decision for one report text."""
        return next(self.label_many([text]))

    def label_many(self, texts: Iterable[str | None], batch_size: int = 256) -> Iterator[Decision]:
        """Decisions for many texts, in order; spaCy parses their segments in batches."""
        pending: list[tuple[list[Segment], bool]] = []
        for text in texts:
            if text is not None and len(text) > MAX_REPORT_CHARS:
                pending.append(([], True))
            else:
                pending.append((self.segments(text or ""), False))
            if len(pending) >= batch_size:
                yield from self._decide_batch(pending)
                pending = []
        if pending:
            yield from self._decide_batch(pending)

    def _decide_batch(self, batch: list[tuple[list[Segment], bool]]) -> Iterator[Decision]:
        flat = [seg for segments, _ in batch for seg in segments]
        docs = iter(self.nlp.pipe((seg.text for seg in flat), batch_size=512))
        for segments, too_long in batch:
            if too_long:
                yield Decision("uncertain", "too_long")
                continue
            found = [m for seg in segments for m in mentions(next(docs), seg.role)]
            yield decide(segments, found, self.rules, self.airspace)


# ------------------------------------------------------------------------------------------
# Reading a reports file
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Report:
    """One input row: where it starts in the file, its key, and its text (None when null)."""

    line: int
    key: str
    text: str | None


def _decode(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ReportsError(f"reports file not found: {path}") from None
    except OSError as exc:
        raise ReportsError(f"cannot read reports file {path}: {exc.strerror}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ReportsError(
            f"{path} line {line}: not UTF-8 text (byte {exc.start}); export the reports as UTF-8"
        ) from None


def _is_json_lines(path: Path, text: str) -> bool:
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        return True
    if path.suffix.lower() in (".csv", ".tsv", ".txt"):
        return False
    return text.lstrip().startswith("{")


def _read_json_lines(path: Path, text: str, key: str, text_column: str) -> list[Report]:
    reports = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ReportsError(f"{path} line {number}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise ReportsError(f"{path} line {number}: not a JSON object")
        fields = {str(k).strip().lower(): v for k, v in row.items()}
        if key not in fields:
            raise ReportsError(f"{path} line {number}: no {key!r} field")
        if text_column not in fields:
            raise ReportsError(f"{path} line {number}: no {text_column!r} field")
        value, body = fields[key], fields[text_column]
        if value is None or isinstance(value, dict | list) or not str(value).strip():
            raise ReportsError(f"{path} line {number}: empty or non-scalar {key}")
        if body is not None and not isinstance(body, str):
            raise ReportsError(f"{path} line {number}: {text_column} is not text")
        reports.append(Report(number, str(value).strip(), body))
    return reports


def _read_csv(path: Path, text: str, key: str, text_column: str) -> list[Report]:
    csv.field_size_limit(max(csv.field_size_limit(), 16 * MAX_REPORT_CHARS))
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = [name.strip().lower() for name in next(reader)]
    except StopIteration:
        raise ReportsError(f"{path}: empty file (expected a header line)") from None
    except csv.Error as exc:
        raise ReportsError(f"{path} line 1: malformed CSV ({exc})") from None
    for wanted, what in ((key, "key"), (text_column, "text")):
        if wanted not in header:
            hint = " (--key)" if what == "key" else " (--text-column)"
            raise ReportsError(
                f"{path} line 1: no {what} column {wanted!r}{hint}; the header names "
                f"{', '.join(h for h in header if h) or 'nothing'}"
            )
    key_at, text_at = header.index(key), header.index(text_column)
    reports = []
    line = 1
    try:
        for fields in reader:
            start, line = line + 1, reader.line_num
            if not fields or (len(fields) == 1 and not fields[0].strip()):
                continue
            if len(fields) != len(header):
                raise ReportsError(
                    f"{path} line {start}: {len(fields)} fields, the header has {len(header)}"
                    " (a quote left open, or a comma in unquoted text?)"
                )
            value = fields[key_at].strip()
            if not value:
                raise ReportsError(f"{path} line {start}: empty {key}")
            reports.append(Report(start, value, fields[text_at]))
    except csv.Error as exc:
        raise ReportsError(f"{path} line {line + 1}: malformed CSV ({exc})") from None
    return reports


def read_reports(
    path: Path, key: str = "accession_number", text_column: str = DEFAULT_TEXT_COLUMN
) -> list[Report]:
    """Every report of a CSV (header line; quoted multi-line text) or JSON Lines file.

    JSON Lines is chosen by the suffix ``.jsonl``/``.ndjson``, or by a first character ``{``.

    Raises
    ------
    ReportsError
        Missing or unreadable file, not UTF-8, no key or text column, a malformed line, an
        empty key; the message names the line.
    """
    if key not in KEYS:
        raise ReportsError(f"--key must be one of {', '.join(KEYS)}, not {key!r}")
    text_column = text_column.strip().lower()
    text = _decode(path)
    if _is_json_lines(path, text):
        return _read_json_lines(path, text, key, text_column)
    return _read_csv(path, text, key, text_column)


# ------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------


@dataclass(slots=True)
class LabelsRun:
    """What ``batchscan labels`` did: counts per label and reason, duplicate keys, files."""

    key: str
    reports: int = 0
    labels: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    duplicates: list[str] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)

    def summary(self) -> str:
        """One paragraph for the console (no report text)."""
        counts = ", ".join(f"{self.labels[name]} {name}" for name in LABELS)
        reasons = ", ".join(f"{r} {n}" for r, n in self.reasons.most_common())
        text = f"batchscan labels: {self.reports} reports: {counts} (reasons: {reasons})"
        if self.duplicates:
            shown = ", ".join(self.duplicates[:10])
            more = f" and {len(self.duplicates) - 10} more" if len(self.duplicates) > 10 else ""
            text += (
                f"; {len(self.duplicates)} {self.key} values given more than once, each row "
                f"kept (evaluate/train count equal labels once and leave conflicting ones "
                f"out): {shown}{more}"
            )
        return text + f"; wrote {', '.join(str(p) for p in self.written)}"


def _write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[str]]) -> None:
    """Write a CSV atomically (:func:`batchscan.storage.files.writing`), readable by owner
    and group only: the labels name studies, the audit quotes reports."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with (
        files.writing(path) as temporary,
        temporary.open("w", encoding="utf-8", newline="") as handle,
    ):
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def run_labels(
    reports_path: Path,
    out: Path,
    *,
    audit: Path | None = None,
    key: str = "accession_number",
    text_column: str = DEFAULT_TEXT_COLUMN,
    airspace: AirspacePolicy = "pneumonia",
    progress: bool = False,
    rules: Rules | None = None,
) -> LabelsRun:
    """Label every report of `reports_path` and write `out` (and `audit`, when given).

    Every input row is one output row, in input order: ``<key>,label,reason``; the audit adds
    ``line`` (where the report starts in the input) and ``evidence`` (the deciding sentences,
    `` | ``-separated).

    Raises
    ------
    ReportsError
        The input cannot be used, or an output would overwrite the input.
    """
    targets = [out] if audit is None else [out, audit]
    source = reports_path.resolve()
    for target in targets:
        if target.resolve() == source:
            raise ReportsError(f"{target} is the reports file itself; it is never written")
    if audit is not None and audit.resolve() == out.resolve():
        raise ReportsError("--audit and --out name the same file")
    reports = read_reports(reports_path, key, text_column)
    labeler = ReportLabeler(rules, airspace)
    texts: Iterable[str | None] = (r.text for r in reports)
    if progress:
        from tqdm import tqdm

        texts = tqdm(texts, total=len(reports), unit="report", file=sys.stderr)
    decisions = list(labeler.label_many(texts))
    run = LabelsRun(key=key, reports=len(reports))
    run.labels.update(d.label for d in decisions)
    run.reasons.update(d.reason for d in decisions)
    seen = Counter(r.key for r in reports)
    run.duplicates = sorted(k for k, n in seen.items() if n > 1)
    _write_csv(
        out,
        (key, "label", "reason"),
        ((r.key, d.label, d.reason) for r, d in zip(reports, decisions, strict=True)),
    )
    run.written.append(out)
    if audit is not None:
        _write_csv(
            audit,
            (key, "label", "reason", "line", "evidence"),
            (
                (r.key, d.label, d.reason, str(r.line), " | ".join(d.evidence))
                for r, d in zip(reports, decisions, strict=True)
            ),
        )
        run.written.append(audit)
    return run
