"""The engine's settings and names, declared once: torch-free, so reading plate.yaml never imports torch.

`PcimOptions` is the one declaration of every engine setting: its type, its bounds, its default and what
it does. The engine takes it as is; `explain:` in plate.yaml (config/explain.py) is derived from it, and
so are `pcim init`'s template and `pcim schema`. A new engine setting is one field here (docs/development.md
"Add a setting"); docs/method.md says why the defaults are what they are.

The name lists (methods, objectives, substrates, schedules, tile aggregations) live here too, so the
config's choices and the engine's branches cannot drift apart.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, ConfigDict, Field, ValidationError, model_validator
from pydantic.dataclasses import dataclass

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
Substrate = Literal["none", "zero", "mean", "blur"]
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


def _adam_beta(value: float) -> float:
    if not 0 <= value < 1:
        raise ValueError(f"beta1 and beta2 (Adam's decay rates) must be in [0, 1), got {value}")
    return value


Budget = Annotated[float | tuple[float, ...] | None, AfterValidator(check_budget)]
AdamBeta = Annotated[float, AfterValidator(_adam_beta)]


def _one_line(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        message = err["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {message}" + ("" if err["type"] == "value_error" else f" (got {err['input']!r})"))
    return "invalid PCIM options: " + "; ".join(parts)


@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class PcimOptions:
    """Settings of one fit (and of the baselines). Defaults are the measured choice (docs/method.md).

    A frozen dataclass: `dataclasses.replace(opts, steps=10)` validates again. Invalid values raise one
    ValueError listing every problem.
    """

    # 49 steps x (kept + deleted image) + 1 pass for the gradient init = 99 classifier passes per map
    steps: int = Field(49, ge=0, description="optimisation steps per map (x 2 images + 1 gradient pass = "
                                             "99 passes); 0: the first logits' map, no fit")
    lr: float = Field(0.3, gt=0, description="Adam's learning rate of the mixing logits")
    per_channel: bool = Field(False, description="one map per input channel instead of one shared map")
    resolution: int = Field(4, ge=1, description="mixing logits at 1/resolution of the field, upsampled "
                                                "bilinearly")
    # how the fit proceeds over its steps (engine/schedule.py)
    schedule: Schedule = Field("constant", description="learning rate over the steps: constant | cosine | step")
    warmup: int = Field(0, ge=0, description="steps of a linear learning-rate warm-up (0: none)")
    init: Init = Field("gradient", description="first mixing logits: gradient (from the input gradient, one "
                                                "more pass) | zero")
    init_scale: float = Field(2.0, gt=0, description="gradient init: the logit of the most relevant cell")
    coarse: int = Field(0, ge=0, description="coarse-to-fine: fit the first coarse_share of the steps at "
                                             "1/coarse of the field, then at 1/resolution (0: off)")
    coarse_share: float = Field(0.5, gt=0, lt=1, description="coarse-to-fine: share of the steps at the "
                                                             "coarse resolution")
    beta1: AdamBeta = Field(0.9, description="Adam's decay rate of the gradient's mean, in [0, 1)")
    beta2: AdamBeta = Field(0.999, description="Adam's decay rate of the gradient's square, in [0, 1)")
    budget: Budget = Field(0.02, description="share of the field a map may keep; several: one fit each, maps "
                                             "averaged; null: the paper's un-clamped n*alpha")
    objective: Objective = Field("keep-delete", description="keep: the kept image keeps the class; "
                                                            "keep-delete: and deleting it loses the class")
    loss: Loss = Field("ce", description="ce: capped log-probabilities; logit: the raw target logit")
    keep_substrate: Substrate = Field("blur", description="what the kept image shows where the mask is off")
    delete_substrate: Substrate = Field("mean", description="what deleted pixels become")
    blur_sigma: float = Field(8.0, ge=0, description="px, for a blur substrate")
    entropy: float = Field(0.0, ge=0, description="weight of the normalised entropy of the mixing weights "
                                                  "(higher: more concentrated maps)")
    tv: float = Field(0.0, ge=0, description="weight of the total variation of the mixing weights")
    noise: float = Field(0.02, ge=0, description="std of the input noise added at each step (varies which "
                                                 "pixel a max-pooling model reads)")
    patience: int = Field(0, ge=0, description="early stopping: stop an image after this many steps without "
                                               "improvement (0: always run `steps`)")
    tol: float = Field(1e-3, gt=0, description="early stopping: relative loss improvement that counts")
    seed: int = Field(0, ge=0, description="seed of the noise (each map has its own stream)")
    map_contrast: bool = Field(True, description="weight the map by |field - deleted value| per pixel: a "
                                                 "weight cell's relevance on the pixels it acts on")
    # the baselines (explain.method other than pcim); PCIM itself ignores them
    ig_steps: int = Field(50, ge=1, description="integrated gradients: Riemann steps from the zero image")
    occlusion_window: int = Field(16, ge=1, description="occlusion: square window (px) set to the channel mean")
    occlusion_stride: int = Field(8, ge=1, description="occlusion: window step (px)")
    rise_masks: int = Field(1000, ge=1, description="RISE: random masks per map")
    rise_cell: int = Field(16, ge=1, description="RISE: size (px) of a cell of the random mask grid")
    rise_p: float = Field(0.5, gt=0, lt=1, description="RISE: probability that a cell is kept")
    # pcim-amortised (engine/explainer.py)
    refine_steps: int = Field(0, ge=0, description="pcim-amortised: per-image fit steps continued from the "
                                                   "explainer's logits")
    refine_lr: float = Field(0.2, gt=0, description="pcim-amortised: learning rate of the refine steps")
    # intensity: the channel shown (an index; plate.yaml names it: config/explain.py); None = auto
    intensity_channel: int | None = Field(None, ge=0, description="intensity: the index of the channel "
                                                                  "shown; None: per image, the best one")

    @model_validator(mode="wrap")
    @classmethod
    def _every_problem_in_one_line(cls, data: Any, handler: Any) -> Any:
        try:
            return handler(data)
        except ValidationError as exc:
            unknown = [str(e["loc"][-1]) for e in exc.errors() if e["type"] == "unexpected_keyword_argument"]
            if unknown:  # as any Python call with a wrong keyword: TypeError
                raise TypeError(f"PcimOptions got unexpected keyword argument(s) {', '.join(unknown)}") from None
            raise ValueError(_one_line(exc)) from None

    @property
    def budgets(self) -> tuple[float, ...]:
        """The budgets fitted side by side (() for the un-clamped paper form)."""
        if self.budget is None:
            return ()
        return tuple(self.budget) if isinstance(self.budget, (tuple, list)) else (self.budget,)


#: the names of the engine settings, in declaration order
ENGINE_KEYS = tuple(PcimOptions.__pydantic_fields__)
