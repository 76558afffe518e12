"""Training domain: does an image lie inside what the model learned from?

The model card declares its training domain (``domain``: the age range in years, the
modalities and the views of its training pictures, and a one-line population). Each image
is judged against it from its header facts, after the header stage:

* ``age_group``: ``child`` (under 18), ``adult``, or None when the age is unknown;
* ``in_domain``: True when modality, view and age all lie inside the card's domain; False
  when any of them lies outside; None when it cannot be decided (an unknown age or view and
  nothing else outside). Out-of-domain images are still scored: what their score is worth is
  the card's and README's to say (adult radiographs scored at chance in a hospital trial).

The age itself (``patient_age_years``) is read by the header stage (PatientAge, else birth
and study dates); the birth date is never stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from batchscan.records import ImageRecord

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
        low, high = spec["age_years"]
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


def judge(record: ImageRecord, domain: Domain | None) -> ImageRecord:
    """Set ``age_group`` and ``in_domain`` on a record whose header was read."""
    record.age_group = age_group(record.patient_age_years)
    if domain is None:
        return record
    outside = False
    unknown = False
    if record.modality:
        outside |= record.modality not in domain.modalities
    else:
        unknown = True
    if record.view and record.view != "unknown":
        outside |= record.view not in domain.views
    else:
        unknown = True
    if record.patient_age_years is None:
        unknown = True
    else:
        years = int(record.patient_age_years)
        outside |= not domain.min_age <= years <= domain.max_age
    record.in_domain = False if outside else (None if unknown else True)
    return record
