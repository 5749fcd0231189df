"""What a run's PCIM_Fit labels say, in words: the count in the run's summary line and the run's advice.

Numbers in, text out (engine/verdict.py defines the labels; docs/verdicts.md explains them). Only `weak`
and `failed` maps are a problem of the fit and warn; `no-local-evidence` (the class rests on what is
missing) and `absent` (the class is not in the field) say what the class is, and get a note.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

#: labels that are a problem of the fit (a warning), and labels that describe the class (a note)
PROBLEMS = ("weak", "failed")
NOTES = ("no-local-evidence", "absent")


def counts_phrase(fits: Mapping[str, int]) -> str:
    """' (2 weak, 1 failed fits; 24 no-local-evidence: see PCIM_Fit)', or '' when every fit is ok."""
    problems = ", ".join(f"{fits.get(k, 0)} {k}" for k in PROBLEMS) + " fits" if any(
        fits.get(k, 0) for k in PROBLEMS) else ""
    notes = ", ".join(f"{fits[k]} {k}" for k in NOTES if fits.get(k, 0))
    parts = [p for p in (problems, notes) if p]
    return f" ({'; '.join(parts)}: see PCIM_Fit)" if parts else ""


def advice(fits: Mapping[str, int], csv: str, adaptive_budget: float | None) -> list[tuple[int, str]]:
    """(logging level, message) for the run: a warning for weak / failed fits with the likely cause and
    the fix, a note for maps whose class has no local evidence or is absent."""
    total = sum(fits.values())
    out: list[tuple[int, str]] = []
    bad = sum(fits.get(k, 0) for k in PROBLEMS)
    if bad:
        grow = ("let the budget grow: explain.adaptive_budget: 0.32 (the default; now null)" if adaptive_budget is None
                else f"raise explain.adaptive_budget (the budget grew up to {adaptive_budget})")
        out.append((logging.WARNING,
                    f"{bad} of {total} maps are weak ({fits.get('weak', 0)}) or failed ({fits.get('failed', 0)}) fits "
                    f"(PCIM_Fit in {csv}): deleting their pixels did not remove the class (PCIM_ProbDeleted stays "
                    "near PCIM_ProbOriginal), and the class does not survive the deletion of the whole field. Likely "
                    f"causes: evidence larger than the budget (confluence, density, texture) -> {grow}; a class that "
                    "rests on what is missing but that the model does not give to a featureless field (so it could "
                    "not be labelled no-local-evidence) -> explain the other class (explain.target: all); or a model "
                    "that reads the evidence poorly (compare the maps with `pcim evaluate`)"))
    nle = fits.get("no-local-evidence", 0)
    if nle:
        out.append((logging.INFO,
                    f"{nle} of {total} maps are no-local-evidence (PCIM_Fit in {csv}): their class rests on what is "
                    "missing (a 'negative' call: no positive cell), so deleting any region, or the whole field, "
                    "leaves it. Not a failure of pcim: no map can hold such a class, and the stain verdict does not "
                    "judge it. The candidates the model looked at and found wanting are in the runner-up class's map "
                    "(explain.target: contrastive adds it to such fields; all makes every class's map)"))
    absent = fits.get("absent", 0)
    if absent:
        out.append((logging.INFO,
                    f"{absent} of {total} maps are absent (PCIM_Fit in {csv}): the class is not in those fields "
                    "(p(target) below 0.01, or below 0.1 with a map that removes nothing); their maps show where the "
                    "class's evidence comes closest, not evidence"))
    return out
