"""Which fields get `explain.fidelity`'s measures: the deletion / insertion AUCs and the stain check.

A field's fidelity curves cost ~20 classifier forwards per map (engine/fidelity.py) and its stain check
~60 per field: a tenth of a per-image fit, but 10-50x an amortised map (docs/speed.md). So
`explain.fidelity_every: N` measures one field in N, in plate order (wells sorted, then their fields:
the plate's first field always, whatever was already done; the same fields on every rerun), and leaves
the others' AUC cells empty (their record says `fidelity: "not sampled"`). `auto` is 1 (every field) for
methods that fit per image and `AMORTISED_EVERY` for pcim-amortised.

The stain check (the plate's verdict) runs on the first field of every well when every field is
measured (as before), and on every sampled field otherwise.
"""

from __future__ import annotations

__all__ = ["AMORTISED_EVERY", "fidelity_every", "fidelity_flags"]

#: one field in 128 for pcim-amortised: measured on the demo set (256 fields of 128 px, CPU per map, one
#: run): fidelity off 17.9 ms, 1 in 256 18.7 ms (+5 %), 1 in 64 20.8 ms (+16 %), every field 117 ms (6.5x);
#: 1 in 128 (~+9 %) still gives a 384-well x 9-field plate 27 fields for its curves and stain verdict
AMORTISED_EVERY = 128


def fidelity_every(fidelity: bool, every: int | str, method: str) -> int:
    """One field in how many gets the fidelity measures (0: none, fidelity off)."""
    if not fidelity:
        return 0
    if every == "auto":
        return AMORTISED_EVERY if method == "pcim-amortised" else 1
    return int(every)


def fidelity_flags(ordinal: int, index: int, every: int) -> dict[str, bool]:
    """`fidelity` and `stain_check` of the field number `ordinal` of the plate (0-based, plate order),
    its well's field number `index`."""
    if every <= 0:
        return {"fidelity": False, "stain_check": False}
    sampled = ordinal % every == 0
    return {"fidelity": sampled, "stain_check": sampled and (every > 1 or index == 0)}
