"""Training domain: does an image lie inside what the model learned from?

The model card declares its training domain (``domain``: the age range in years, the
modalities and the views of its training pictures, and a one-line population). Each image
is judged against it from its header facts, after the header stage:

* ``age_group``: ``child`` (under 18), ``adult``, or None when the age is unknown;
* ``in_domain``: True when modality, view and age all lie inside the card's domain; False
  when any of them lies outside; None when it cannot be decided (an unknown age or view and
  nothing else outside). Out-of-domain images are still scored: what their score is worth is
  the card's and the documentation's to say (adult radiographs scored at chance in a
  hospital trial).

The age itself (``patient_age_years``) is read by the header stage (PatientAge, else birth
and study dates); the birth date is never stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from batchscan.ingest.records import ImageRecord

#: Ages at and above this are adults (``age_group``).
ADULT_AGE: Final = 18.0


@dataclass(frozen=True, slots=True)
class Domain:
    """The training domain a model card declares.

    Attributes
    ----------
    min_age, max_age:
        Age range in years of the training patients (inclusive; ages are compared as whole
        years, so a child of 5 years and 11 months is 5).
    modalities, views:
        DICOM Modality and view values of the training pictures.
    population:
        One line on who the training patients were.
    """

    min_age: float
    max_age: float
    modalities: frozenset[str]
    views: frozenset[str]
    population: str

    @classmethod
    def from_card(cls, card: dict[str, Any]) -> Domain | None:
        """The card's ``domain``, or None for a card that declares none (no judgement)."""
        spec = card.get("domain")
        if not isinstance(spec, dict):
            return None
        low, high = spec.get("age_years") or (0, 200)  # no ages known: age not judged
        return cls(
            min_age=float(low),
            max_age=float(high),
            modalities=frozenset(spec["modalities"]),
            views=frozenset(spec["views"]),
            population=str(spec.get("population", "")),
        )


def age_group(age: float | None) -> str | None:
    """``child`` under 18, ``adult`` from 18, None when unknown."""
    if age is None:
        return None
    return "adult" if age >= ADULT_AGE else "child"


def outside(record: ImageRecord, domain: Domain) -> list[tuple[str, str]]:
    """What puts a record outside `domain`: (criterion, detail) pairs, criterion one of
    ``modality``, ``view``, ``age`` in that order; empty when nothing known is outside."""
    found: list[tuple[str, str]] = []
    if domain.modalities and record.modality and record.modality not in domain.modalities:
        found.append(
            (
                "modality",
                f"modality {record.modality}, the model learned from "
                f"{'/'.join(sorted(domain.modalities))}",
            )
        )
    if (
        domain.views
        and record.view
        and record.view != "unknown"
        and record.view not in domain.views
    ):
        found.append(
            ("view", f"view {record.view}, the model learned from {'/'.join(sorted(domain.views))}")
        )
    if record.patient_age_years is not None:
        years = int(record.patient_age_years)
        if not domain.min_age <= years <= domain.max_age:
            found.append(
                (
                    "age",
                    f"age {years} years, the model learned from ages "
                    f"{domain.min_age:g}-{domain.max_age:g}",
                )
            )
    return found


def judge(record: ImageRecord, domain: Domain | None, skip: bool = False) -> ImageRecord:
    """Set ``age_group`` and ``in_domain`` on a record whose header was read; with `skip`
    (``--out-of-domain skip``) an out-of-domain record is ``skipped: out_of_domain:<why>``,
    why being the first of ``modality``, ``view``, ``age`` that lies outside."""
    record.age_group = age_group(record.patient_age_years)
    if domain is None:
        return record
    reasons = outside(record, domain)
    unknown = (
        not record.modality
        or not record.view
        or record.view == "unknown"
        or record.patient_age_years is None
    )
    record.in_domain = False if reasons else (None if unknown else True)
    if skip and reasons and record.pending:
        criterion = reasons[0][0]
        record.skip(f"out_of_domain:{criterion}", "; ".join(d for _, d in reasons))
    return record


def study_in_domain(values: list[bool | None]) -> bool | None:
    """A study's ``in_domain`` from those of the images its score rests on: False when any
    is outside (a maximum may come from that image), else None when any is undecided,
    else True (and None for no image)."""
    if any(v is False for v in values):
        return False
    if not values or any(v is None for v in values):
        return None
    return True
