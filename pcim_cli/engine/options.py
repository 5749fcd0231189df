"""The engine's settings and names, declared once, on the standard library alone: reading plate.yaml never
imports torch, and the engine runs where only torch and numpy are installed (benchmarks/gpu_bench.py).

`PcimOptions` is the one declaration of every engine setting: its type, its default, its bounds or
choices, and what it does (`setting(...)`). The engine takes it as is; `explain:` in plate.yaml
(config/explain.py) is derived from it, and so are `pcim init`'s template and `pcim schema`. A new engine
setting is one field here (docs/development.md "How to add"); docs/method.md says why the defaults are
what they are.

The name lists (methods, objectives, substrates, schedules, tile aggregations) live here too, so the
config's choices and the engine's branches cannot drift apart.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

#: every attribution method `explain.method` can name (engine/attribute.py has their branches); the last
#: two are the trivial maps, made without a model (engine/trivial.py)
Method = Literal["pcim", "pcim-amortised", "saliency", "integrated-gradients", "occlusion", "rise", "intensity",
                 "contrast"]
METHODS: tuple[str, ...] = Method.__args__
TRIVIAL = METHODS[-2:]
BACKENDS = ("auto", "captum", "torch")

#: the PcimOptions fields each method reads (besides per_channel); the settings fingerprint uses them
BASELINE_KEYS = ("ig_steps", "occlusion_window", "occlusion_stride", "rise_masks", "rise_cell", "rise_p",
                 "intensity_channel")
#: read by pcim-amortised only (which ignores steps and lr: its refine has its own)
AMORTISED_KEYS = ("refine_steps", "refine_lr")
METHOD_KEYS = {
    "saliency": (),
    "integrated-gradients": ("ig_steps",),
    "occlusion": ("occlusion_window", "occlusion_stride"),
    "rise": ("rise_masks", "rise_cell", "rise_p"),
    "intensity": ("intensity_channel",),
    "contrast": ("delete_substrate", "blur_sigma"),
}
#: the PcimOptions that define the objective an explainer was trained for: a use with other values is refused
OBJECTIVE_KEYS = ("per_channel", "resolution", "budget", "objective", "loss", "keep_substrate",
                  "delete_substrate", "blur_sigma", "entropy", "tv")

Objective = Literal["keep", "keep-delete"]
Loss = Literal["ce", "logit"]
Substrate = Literal["none", "zero", "mean", "median", "blur"]
Schedule = Literal["constant", "cosine", "step"]
Init = Literal["zero", "gradient"]
OBJECTIVES: tuple[str, ...] = Objective.__args__
LOSSES: tuple[str, ...] = Loss.__args__
SUBSTRATES: tuple[str, ...] = Substrate.__args__
SCHEDULES: tuple[str, ...] = Schedule.__args__
INITS: tuple[str, ...] = Init.__args__

#: a tiled field's prediction (model.aggregate): mean of its tiles' logits, of their probabilities, the
#: largest probability per class, or the model on the untiled field (any-size models)
Aggregate = Literal["mean-prob", "mean-logit", "max", "whole-field"]
AGGREGATES: tuple[str, ...] = Aggregate.__args__
#: tiled fields (explain.tile_maps): one fit over the field, per tile, or per tile weighted by its evidence
TileMaps = Literal["field", "per-tile", "evidence"]
TILE_MAPS: tuple[str, ...] = TileMaps.__args__


def check_budget(value: Any) -> Any:
    """One share of the field in (0, 1], several, or None (the paper's un-clamped n * alpha)."""
    values = list(value) if isinstance(value, (list, tuple)) else [] if value is None else [value]
    if isinstance(value, (list, tuple)) and not values:
        raise ValueError("empty list: give one budget, several, or null")
    if any(not 0 < v <= 1 for v in values):
        raise ValueError(f"every budget must be a share of the field in (0, 1], got {value}")
    return value


def check_adam_beta(value: float) -> float:
    """Adam's decay rates are in [0, 1)."""
    if not 0 <= value < 1:
        raise ValueError(f"beta1 and beta2 (Adam's decay rates) must be in [0, 1), got {value}")
    return value


def setting(default: Any, description: str, *, ge: float | None = None, gt: float | None = None,
            le: float | None = None, lt: float | None = None, choices: tuple[str, ...] | None = None,
            check: Callable[[Any], Any] | None = None) -> Any:
    """A field of PcimOptions: its default, what it does, and what values it takes (bounds of a number, or
    `choices`, or a `check` that raises ValueError). config/explain.py turns the same into plate.yaml's."""
    return dataclasses.field(default=default, metadata={
        "description": description, "ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices, "check": check})


_BOUNDS = (("ge", ">=", lambda v, b: v >= b), ("gt", ">", lambda v, b: v > b), ("le", "<=", lambda v, b: v <= b),
           ("lt", "<", lambda v, b: v < b))


def problems(opts: Any) -> list[str]:
    """What is wrong with each field of `opts` (a PcimOptions), by the declaration of its field."""
    out = []
    for f in dataclasses.fields(opts):
        value, meta = getattr(opts, f.name), f.metadata
        if meta.get("choices") is not None and value not in meta["choices"]:
            out.append(f"{f.name} must be one of {meta['choices']}, got {value!r}")
        if meta.get("check") is not None:
            try:
                meta["check"](value)
            except ValueError as exc:
                out.append(f"{f.name}: {exc}")
        if value is None or isinstance(value, (str, tuple, list)):
            continue
        for key, sign, ok in _BOUNDS:
            if meta.get(key) is not None and not ok(value, meta[key]):
                out.append(f"{f.name} must be {sign} {meta[key]}, got {value}")
    return out


@dataclasses.dataclass(frozen=True)
class PcimOptions:
    """Settings of one fit (and of the baselines). Defaults are the measured choice (docs/method.md).

    A frozen dataclass: `dataclasses.replace(opts, steps=10)` checks again. Invalid values raise one
    ValueError listing every problem.
    """

    # 49 steps x (kept + deleted image) + 1 pass for the gradient init = 99 classifier passes per map
    steps: int = setting(49, "optimisation steps per map (x 2 images + 1 gradient pass = 99 passes); 0: the "
                             "first logits' map, no fit", ge=0)
    lr: float = setting(0.3, "Adam's learning rate of the mixing logits", gt=0)
    per_channel: bool = setting(False, "one map per input channel instead of one shared map")
    resolution: int = setting(4, "mixing logits at 1/resolution of the field, upsampled bilinearly", ge=1)
    # how the fit proceeds over its steps (engine/schedule.py)
    schedule: str = setting("constant", "learning rate over the steps: constant | cosine | step", choices=SCHEDULES)
    warmup: int = setting(0, "steps of a linear learning-rate warm-up (0: none)", ge=0)
    init: str = setting("gradient", "first mixing logits: gradient (from the input gradient, one more pass) | zero",
                        choices=INITS)
    init_scale: float = setting(2.0, "gradient init: the logit of the most relevant cell", gt=0)
    coarse: int = setting(0, "coarse-to-fine: fit the first coarse_share of the steps at 1/coarse of the field, "
                             "then at 1/resolution (0: off)", ge=0)
    coarse_share: float = setting(0.5, "coarse-to-fine: share of the steps at the coarse resolution", gt=0, lt=1)
    beta1: float = setting(0.9, "Adam's decay rate of the gradient's mean, in [0, 1)", check=check_adam_beta)
    beta2: float = setting(0.999, "Adam's decay rate of the gradient's square, in [0, 1)", check=check_adam_beta)
    budget: float | tuple[float, ...] | None = setting(
        0.02, "share of the field a map may keep; several: one fit each, maps averaged; null: the paper's "
              "un-clamped n*alpha", check=check_budget)
    # engine/schedule.py BudgetGrowth; docs/defaults.md "Evidence larger than the budget"
    adaptive_budget: float | None = setting(
        0.32, "grow each map's budget within its one fit, up to this share of the field: from step 12, every 6 "
              "steps, a map whose deleted image still holds more than half of p(target) doubles its budget (no "
              "extra passes); null: the budget stays fixed", gt=0, le=1)
    objective: str = setting("keep-delete", "keep: the kept image keeps the class; keep-delete: and deleting it "
                                            "loses the class", choices=OBJECTIVES)
    loss: str = setting("ce", "ce: capped log-probabilities; logit: the raw target logit", choices=LOSSES)
    keep_substrate: str = setting("blur", "what the kept image shows where the mask is off", choices=SUBSTRATES)
    delete_substrate: str = setting("median", "what deleted pixels become; median: each channel's median over "
                                              "the field, its background while the evidence covers less than "
                                              "half of it (the mean drifts towards large evidence)",
                                    choices=SUBSTRATES)
    blur_sigma: float = setting(8.0, "px, for a blur substrate", ge=0)
    entropy: float = setting(0.0, "weight of the normalised entropy of the mixing weights (higher: more "
                                  "concentrated maps)", ge=0)
    tv: float = setting(0.0, "weight of the total variation of the mixing weights", ge=0)
    noise: float = setting(0.02, "std of the input noise added at each step (varies which pixel a max-pooling "
                                 "model reads)", ge=0)
    patience: int = setting(0, "early stopping: stop an image after this many steps without improvement (0: "
                               "always run `steps`)", ge=0)
    tol: float = setting(1e-3, "early stopping: relative loss improvement that counts", gt=0)
    seed: int = setting(0, "seed of the noise (each map has its own stream)", ge=0)
    map_contrast: bool = setting(True, "weight the map by |field - deleted value| per pixel: a weight cell's "
                                       "relevance on the pixels it acts on")
    # the baselines (explain.method other than pcim); PCIM itself ignores them
    ig_steps: int = setting(50, "integrated gradients: Riemann steps from the zero image", ge=1)
    occlusion_window: int = setting(16, "occlusion: square window (px) set to the channel mean", ge=1)
    occlusion_stride: int = setting(8, "occlusion: window step (px)", ge=1)
    rise_masks: int = setting(1000, "RISE: random masks per map", ge=1)
    rise_cell: int = setting(16, "RISE: size (px) of a cell of the random mask grid", ge=1)
    rise_p: float = setting(0.5, "RISE: probability that a cell is kept", gt=0, lt=1)
    # pcim-amortised (engine/explainer.py)
    refine_steps: int = setting(0, "pcim-amortised: per-image fit steps continued from the explainer's logits",
                                ge=0)
    refine_lr: float = setting(0.2, "pcim-amortised: learning rate of the refine steps", gt=0)
    # intensity: the channel shown (an index; plate.yaml names it: config/explain.py); None = auto
    intensity_channel: int | None = setting(None, "intensity: the index of the channel shown; None: per image, "
                                                  "the best one", ge=0)

    def __post_init__(self) -> None:
        if isinstance(self.budget, list):  # from YAML / JSON
            object.__setattr__(self, "budget", tuple(self.budget))
        found = problems(self)
        if found:
            raise ValueError("invalid PCIM options: " + "; ".join(found))

    @property
    def budgets(self) -> tuple[float, ...]:
        """The budgets fitted side by side (() for the un-clamped paper form)."""
        if self.budget is None:
            return ()
        return tuple(self.budget) if isinstance(self.budget, (tuple, list)) else (self.budget,)


#: the names of the engine settings, in declaration order
ENGINE_KEYS = tuple(f.name for f in dataclasses.fields(PcimOptions))


# ---------------------------------------------------------------- shortcut QC (engine/shares.py, config/qc.py)

#: the field border of the shortcut QC: this share of the field's shorter side (qc.border)
QC_BORDER_FRACTION = 0.05
#: region -> the word of its CSV column PCIM_Share_<word> (io/summary.py), in CSV order
QC_COLUMNS = {"objects": "OnObjects", "background": "Background", "border": "Border", "saturated": "Saturated",
              "seams": "Seams"}
