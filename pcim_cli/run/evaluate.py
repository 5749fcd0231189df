"""`pcim evaluate`, the computing part: every method on (a sample of) a plate, scored against masks.

For each method (PCIM and the baselines of `explain.method`), the maps of the chosen fields are
computed in-process with the plate's settings (nothing is written to the store) and scored against
masks of the true evidence: localisation (pointing game at 0 and 3 px, relevance mass, relevance
rank accuracy, pixel AUROC), fidelity (deletion AUC over the top 20% of pixels in 0.5% steps to the
channel mean, and over the top 2% in 0.1% steps; insertion AUC over all pixels on a blurred image),
sparseness (Gini) and seconds per map. The sanity check of Adebayo et al. (2018) recomputes every map
on a copy of the model whose parameters are redrawn at random: a map that still looks the same (high
Spearman rank correlation) does not depend on what the model learned. The trivial maps (`intensity`,
`contrast`; engine/trivial.py) are methods like the others; `intensity_channel: auto` is resolved here
for the whole sample (the channel whose intensity deletes the class fastest) and reported, and the
stain verdict (engine/verdict.py) compares the best trivial map with PCIM's. `score_plate` returns
the scores (data); report/evaluate.py writes comparison.{md,csv,json}, scores.csv and the plots.
`compare` is the scoring part alone (tensors in), also used by the benchmarks.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import tifffile
import torch

from pcim_cli.config import RunConfig
from pcim_cli.engine import absence, metrics, object_ranking, shares, trivial, verdict
from pcim_cli.engine.attribute import METHODS, attribute
from pcim_cli.engine.pcim import PcimOptions, PcimResult
from pcim_cli.engine.verdict import Verdict
from pcim_cli.errors import ConfigError, InputDataError
from pcim_cli.io import images, plate
from pcim_cli.io import labels as label_io
from pcim_cli.run import inventory, objects, shortcut_qc
from pcim_cli.run.task import QcTask

__all__ = ["COLUMNS", "DEFAULT_METHODS", "DIRECTIONS", "Comparison", "EvalField", "PlateScores", "choose_wells",
           "compare", "has_evidence", "maps_in_batches", "mask_path", "mean_table", "randomized_copy", "read_fields",
           "score_maps", "score_plate"]

logger = logging.getLogger(__name__)

#: compared by default; pcim-amortised joins them when explain.explainer names a trained explainer
DEFAULT_METHODS = tuple(m for m in METHODS if m != "pcim-amortised")
#: deletion: the top 20% of pixels in 0.5% steps (the evidence is small; coarse steps saturate)
DELETION_FRACTIONS = torch.linspace(0.0, 0.2, 41)
#: fine deletion: the top 2% in 0.1% steps (where a stain map and a method's map differ most)
FINE_DELETION_FRACTIONS = torch.linspace(0.0, 0.02, 21)
INSERTION_FRACTIONS = torch.linspace(0.0, 1.0, 21)
#: score columns in table order, with their labels
COLUMNS = {
    "pointing_game": "pointing",
    "pointing_game_3px": "pointing 3px",
    "relevance_mass": "mass",
    "rank_accuracy": "rank acc.",
    "pixel_auroc": "AUROC",
    "deletion_auc": "deletion",
    "fine_deletion_auc": "deletion 2%",
    "insertion_auc": "insertion",
    "sparseness": "Gini",
    "randomisation_spearman": "rand. ρ",
    **object_ranking.COLUMNS,  # with plate.objects only
    "share_off_objects": "off objects",  # the shortcut QC's shares (qc.enabled; docs/shortcuts.md)
    "share_border": "border",
    "s_per_map": "s/map",
}
DIRECTIONS = {**metrics.DIRECTIONS, "pointing_game_3px": "higher", "fine_deletion_auc": "lower",
              "s_per_map": "lower", **dict.fromkeys(object_ranking.COLUMNS, "higher"),
              "share_off_objects": "none", "share_border": "none"}  # where a map lies: no better or worse
EXAMPLES_MAX = 16  # maps kept per method for the overlays (the examples are picked among them)


@dataclass
class Comparison:
    """The scores of every method on one set of images (what `compare` returns)."""

    scores: pd.DataFrame  # one row per (method, image)
    table: pd.DataFrame  # one row per method: mean scores
    curves: dict[str, dict[str, list[float]]]  # method -> mean deletion / fine deletion / insertion curve
    maps_shown: dict[str, torch.Tensor]  # method -> the first EXAMPLES_MAX joint maps, for the overlays
    intensity_channel: str | None = None
    verdicts: list[Verdict] = field(default_factory=list)


@dataclass
class EvalField:
    """A field scored by evaluate: its normalised image, its evidence mask and its objects."""


    well: str
    site: int
    x: torch.Tensor  # (C, H, W), normalised
    mask: torch.Tensor | None  # (H, W) bool, None when no mask file was found
    labels: torch.Tensor | None = None  # (H, W) objects of the first plate.objects kind, when there is one


@dataclass
class PlateScores:
    """What `score_plate` computed on a plate: the comparison and what it was computed on."""

    comparison: Comparison
    fields: list[EvalField]
    x: torch.Tensor  # (B, C, H, W), the fields' images
    methods: list[str]
    opts: PcimOptions
    explainer_sha256: str | None = None


def score_plate(cfg: RunConfig, masks: str, methods: Sequence[str] | None = None,
                wells: int | Sequence[str] | None = None, sanity: bool = True, seed: int = 0) -> PlateScores:
    """Score every method's maps against the masks named by `masks` (a path pattern with {well} or
    {row}/{col}, and {field}, e.g. "masks/{well}_s{field}.tif"; nonzero = evidence).

    wells: None = every well; an int N = N wells spread evenly over the plate, those whose masks mark
    evidence first; a list = those wells. methods: default DEFAULT_METHODS, plus pcim-amortised when
    explain.explainer is set. The sanity check of pcim-amortised keeps the explainer (trained for the real
    model) and randomises the model: without refine steps its maps do not depend on the model at all
    (rand. rho = 1), by construction.
    """
    if methods is None:
        methods = DEFAULT_METHODS + (("pcim-amortised",) if cfg.explain.explainer is not None else ())
    methods = _check_methods(methods)
    if cfg.explain.target == "all":
        raise ConfigError("explain.target: evaluate scores one map per field against its mask; use predicted, "
                          "a class name or layout:<column>, not all")
    inv = inventory.inspect_plate(cfg, explainer="pcim-amortised" in methods)
    explainer = None if inv.explainer is None else inv.explainer.module
    chosen = choose_wells(inv.fields, masks, wells)
    fields = read_fields(cfg, inv.fields, chosen, masks)
    if not any(f.mask is not None and bool(f.mask.any()) for f in fields):
        raise InputDataError(f"no mask with any evidence found for the chosen fields with --masks {masks!r}; "
                             "check the pattern (tokens {well} or {row}/{col}, and {field})")
    model = inv.model.module
    x = torch.stack([f.x for f in fields]).to(inv.model.device)
    target = _targets(cfg, inv, fields, model, x)
    random_model = randomized_copy(model, seed) if sanity else None
    opts = inventory.engine_options(cfg)
    batch = cfg.compute.batch_size
    objects_scorer = None
    if any(f.labels is not None for f in fields):
        objects_scorer = object_ranking.ObjectScorer(model, x, target, [f.labels for f in fields],
                                                     [f.mask for f in fields], opts, cfg.explain.top_objects, batch)
    comp = compare(model, x, target, fields, methods, opts, batch, list(cfg.plate.channels), inv.classes,
                   random_model, objects_scorer=objects_scorer, explainer=explainer, qc=shortcut_qc.qc_task(cfg))
    return PlateScores(comp, fields, x, methods, opts, None if inv.explainer is None else inv.explainer.sha256)


def compare(model, x: torch.Tensor, target: torch.Tensor, fields: list[EvalField], methods: Sequence[str],
            opts: PcimOptions, batch: int, channels: Sequence[str], classes: Sequence[str],
            random_model=None, maps_fn: Callable | None = None, scorer=None,
            objects_scorer=None, explainer=None, qc: QcTask | None = None) -> Comparison:
    """Every method's maps of x (B, C, H, W) for target (B,), scored against the fields' masks; the
    sanity check on `random_model` when given; intensity_channel auto resolved for the whole batch; the
    stain verdict per target class (PCIM's maps, or the first non-trivial method's, against the best
    trivial map).

    maps_fn(model, x, target, method, opts, batch) -> maps, or a PcimResult (default: `attribute` in
    batches), and scorer (the forward that deletion and insertion ask; default: model) let a caller explain
    fields tile by tile and score the stitched maps on whole fields (benchmarks with fixed-input models).
    With a PcimResult, the reference method's maps get their PCIM_Fit labels (engine/verdict.py), and
    the verdict judges only the maps that hold evidence; with bare maps every map counts.
    objects_scorer (engine/object_ranking.ObjectScorer) adds the object ranking scores (plate.objects);
    explainer: the trained explainer module that the default maps_fn gives pcim-amortised; qc (the
    shortcut QC's settings) adds each map's share off the objects and at the border, as `pcim explain`
    measures them (docs/shortcuts.md), so methods can be compared on where they put their weight.
    """
    maps_fn = maps_fn or functools.partial(results_in_batches, explainer=explainer)
    scorer = model if scorer is None else scorer
    stain = trivial.deletion_aucs(scorer, x, trivial.candidate_maps(x, opts, channels), target,
                                  FINE_DELETION_FRACTIONS, DELETION_FRACTIONS)
    channel = None if opts.per_channel else opts.intensity_channel
    if channel is None and not opts.per_channel:  # auto: the plate's channel, by the criterion of best_channel
        channel = int(torch.stack([(stain[f"intensity:{c}"][0] + stain[f"intensity:{c}"][1]).mean()
                                   for c in channels]).argmin())
        logger.info("intensity_channel auto: %s (its intensity deletes the target class fastest)", channels[channel])
    per_image, curves, maps_shown = [], {}, {}
    reference = _reference(methods)
    checks: dict[str, Any] = {}
    for method in methods:
        m_opts = dataclasses.replace(opts, intensity_channel=channel) if method == "intensity" else opts
        t0 = time.perf_counter()
        maps = maps_fn(model, x, target, method, m_opts, batch)
        seconds = (time.perf_counter() - t0) / len(fields)
        if method == reference:  # the stain verdict's numbers: labels and deletion curves at doubling shares
            checks = {"labels": _fit_labels(scorer, x, target, maps), "budgets": _budgets(maps, m_opts, len(x)),
                      "curves": trivial.deletion_curves(scorer, x, {"map": getattr(maps, "maps", maps)}, target,
                                                        substrate=opts.delete_substrate, blur_sigma=opts.blur_sigma)}
        maps = getattr(maps, "maps", maps)
        scores, curve = score_maps(scorer, x, target, maps, fields)
        if objects_scorer is not None:
            scores.update(objects_scorer.scores(maps))
        if qc is not None:
            scores.update(shortcut_shares(maps, x, fields, qc))
        if random_model is not None:
            random_maps = maps_fn(random_model, x, target, method, m_opts, batch)
            scores["randomisation_spearman"] = metrics.spearman(
                maps, getattr(random_maps, "maps", random_maps), support="union").tolist()
        curves[method] = curve
        maps_shown[method] = maps[:EXAMPLES_MAX].sum(1).cpu()
        for i, f in enumerate(fields):
            per_image.append({"method": method, "well": f.well, "site": f.site, "target": int(target[i]),
                              **{k: v[i] for k, v in scores.items()}, "s_per_map": seconds})
        logger.info("%s: %d maps, %.2f s/map", method, len(fields), seconds)
    scores_df = pd.DataFrame(per_image)
    verdicts = []
    if reference is not None:
        candidates = trivial.deletion_curves(scorer, x, trivial.candidate_maps(x, opts, channels), target,
                                             substrate=opts.delete_substrate, blur_sigma=opts.blur_sigma)
        verdicts = _verdicts(reference, checks, candidates, target, classes)
    return Comparison(scores=scores_df, table=mean_table(scores_df, list(methods)), curves=curves,
                      maps_shown=maps_shown,
                      intensity_channel=None if channel is None else channels[channel], verdicts=verdicts)


def _reference(methods: Sequence[str]) -> str | None:
    """The method whose maps the stain verdict judges: pcim, else the first one that needs a model."""
    return next((m for m in ("pcim", *methods) if m in methods and m not in trivial.TRIVIAL), None)


def _fit_labels(scorer, x: torch.Tensor, target: torch.Tensor, result) -> list[str] | None:
    """PCIM_Fit of each map of a PcimResult (None for bare maps: every map counts as holding evidence)."""
    if not hasattr(result, "prob_mixed"):
        return None
    full = absence.full_deletion_probs(scorer, x).gather(1, target.view(-1, 1).to(x.device))[:, 0]
    return [verdict.fit_quality(*(float(v) for v in values)) for values in
            zip(result.prob_original, result.prob_mixed, result.prob_deleted, full, strict=True)]


def _budgets(result, opts: PcimOptions, n: int) -> list[float | None]:
    """The share of the field each map could keep: the fit's own (an adaptive budget), else the option's."""
    found = getattr(result, "budget", None)
    if found is not None:
        return [float(b) for b in found]
    budgets = opts.budgets
    return [max(budgets) if budgets else None] * n


def _verdicts(reference: str, checks: dict[str, Any], candidates: dict[str, torch.Tensor], target: torch.Tensor,
              classes: Sequence[str]) -> list[Verdict]:
    """One verdict per target class (most maps first) from the reference's labels and deletion curves."""
    labels = checks["labels"] or [""] * len(target)
    curves = {**checks["curves"], **candidates}
    out = []
    for t in sorted(set(target.tolist()), key=lambda t: -int((target == t).sum())):
        rows = [i for i in range(len(target)) if int(target[i]) == t]
        fits = Counter(labels[i] for i in rows if labels[i])
        found = [verdict.check_from_curves(float(curves["map"][i, 0]), verdict.HALVING,
                                           {n: c[i] for n, c in curves.items()}, checks["budgets"][i])
                 for i in rows if labels[i] in (*verdict.JUDGED, "")]
        out.append(verdict.judge(classes[t], reference, [c for c in found if c is not None], fits or None))
    return out


def _check_methods(methods: Sequence[str]) -> list[str]:
    methods = [m.strip() for m in methods if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ConfigError(f"--methods: unknown method(s) {', '.join(unknown) or '(none given)'}; "
                          f"choose from {','.join(METHODS)}")
    return list(dict.fromkeys(methods))


def mask_path(pattern: str, well: str, site: int) -> Path | None:
    """The mask file of a field: the pattern with {well} (A01, else A1), {row}, {col} and {field}."""
    w = plate.parse_well(well)
    for name in dict.fromkeys((w.name, f"{w.row_letter}{w.col_number}")):
        path = Path(pattern.format(well=name, row=w.row_letter, col=w.col_number, field=site)).expanduser()
        if path.is_file():
            return path
    return None


def _read_mask(path: Path, shape: tuple[int, int]) -> torch.Tensor:
    try:
        arr = np.asarray(tifffile.imread(path))
    except Exception as exc:  # noqa: BLE001 - any unreadable file is one data problem
        raise InputDataError(f"mask {path} cannot be read: {exc}") from None
    arr = arr.reshape(-1, *arr.shape[-2:]).max(0) if arr.ndim > 2 else arr
    if arr.shape != shape:
        raise InputDataError(f"mask {path} is {arr.shape[0]}x{arr.shape[1]} px but its field is "
                             f"{shape[0]}x{shape[1]}; masks must have the size of the fields")
    return torch.from_numpy(arr != 0)


def choose_wells(found: dict, pattern: str, wells: int | Sequence[str] | None) -> list[str]:
    all_wells = sorted(found, key=plate.parse_well)
    if wells is None:
        return all_wells
    if isinstance(wells, int):
        if wells < 1:
            raise ConfigError(f"--wells: give a number >= 1 or a list of wells, got {wells}")
        marked = [w for w in all_wells if any(has_evidence(pattern, w, src.field) for src in found[w])]
        ranked = _spread(marked, wells) + _spread([w for w in all_wells if w not in marked], wells)
        return sorted(ranked[:wells], key=plate.parse_well)
    names = {plate.parse_well(w).name: w for w in all_wells}
    missing = [w for w in wells if plate.parse_well(w).name not in names]
    if missing:
        raise ConfigError(f"--wells: {', '.join(missing)} not found on the plate (wells with images: "
                          f"{', '.join(all_wells[:8])}{'…' if len(all_wells) > 8 else ''})")
    return [names[plate.parse_well(w).name] for w in wells]


def _spread(items: list[str], n: int) -> list[str]:
    """Up to n items evenly spaced over the list (first and last included)."""
    if len(items) <= n:
        return items
    idx = np.linspace(0, len(items) - 1, n).round().astype(int)
    return [items[i] for i in dict.fromkeys(idx.tolist())]


def has_evidence(pattern: str, well: str, site: int) -> bool:
    path = mask_path(pattern, well, site)
    return path is not None and bool(np.any(tifffile.imread(path)))


def read_fields(cfg: RunConfig, found: dict, wells: list[str], pattern: str) -> list[EvalField]:
    norm = cfg.model.normalize.model_dump()
    kinds = dict(list(objects.label_kinds(cfg.plate.objects).items())[:1])  # the first kind is scored
    out, shapes = [], set()
    for well in wells:
        for src in found[well]:
            img = images.read_normalized(src, len(cfg.plate.channels), norm)
            path = mask_path(pattern, well, src.field)
            if path is None:
                logger.warning("%s field %s: no mask file for pattern %r; scored for fidelity only",
                               well, src.field, pattern)
            mask = _read_mask(path, img.shape[-2:]) if path is not None else None
            out.append(EvalField(well, src.field, torch.from_numpy(img), mask, _read_objects(kinds, well, src.field,
                                                                                          img.shape[-2:])))
            shapes.add(img.shape)
    if len(shapes) > 1:
        raise InputDataError(f"evaluate needs fields of one size, found {sorted(shapes)}; choose wells of one "
                             "size with --wells")
    if cfg.model.input_size is not None and tuple(out[0].x.shape[-2:]) != tuple(cfg.model.input_size):
        raise ConfigError(f"model.input_size is {cfg.model.input_size} but the fields are "
                          f"{tuple(out[0].x.shape[-2:])}; evaluate needs whole-field models (input_size: null)")
    return out


def _read_objects(kinds: dict, well: str, site: int, shape: tuple[int, int]) -> torch.Tensor | None:
    """The field's label image of the first plate.objects kind (None without one, with a warning)."""
    for name, kind in kinds.items():
        path = kind.path(well, site)
        try:
            if path is None:
                raise label_io.LabelError(kind.problem(well, site) or f"{well} site {site}: no {name} labels")
            return torch.from_numpy(label_io.read_labels(path, tuple(shape), name).astype("int64"))
        except label_io.LabelError as exc:
            logger.warning("%s; objects of this field not scored", exc)
    return None


def _targets(cfg: RunConfig, inv, fields: list[EvalField], model, x: torch.Tensor) -> torch.Tensor:
    """One target class per field: the predicted class, or the class explain.target names."""
    with torch.no_grad():
        predicted = torch.cat([model(x[i : i + 16]).argmax(1) for i in range(0, len(x), 16)])
    per_well = inventory.targets_per_well(cfg, inv.classes, inv.layout, sorted({f.well for f in fields}))
    out = []
    for i, f in enumerate(fields):
        t = per_well[f.well]
        if isinstance(t, str):
            raise ConfigError(t)
        out.append(int(predicted[i]) if t is None else inv.classes.index(t[0]))
    return torch.tensor(out, device=x.device)


def results_in_batches(model, x: torch.Tensor, target: torch.Tensor, method: str, opts: PcimOptions,
                       batch: int, explainer=None) -> PcimResult:
    """`attribute` in batches, the batches' results joined into one."""
    seeds = opts.seed + torch.arange(len(x))
    parts = [attribute(model, x[i : i + batch], target[i : i + batch], method, opts, seeds=seeds[i : i + batch],
                       explainer=explainer)
             for i in range(0, len(x), batch)]
    return PcimResult(**{f.name: None if getattr(parts[0], f.name) is None
                         else torch.cat([getattr(p, f.name) for p in parts])
                         for f in dataclasses.fields(PcimResult)})


def maps_in_batches(model, x: torch.Tensor, target: torch.Tensor, method: str, opts: PcimOptions,
                    batch: int, explainer=None) -> torch.Tensor:
    """The maps of `results_in_batches`."""
    return results_in_batches(model, x, target, method, opts, batch, explainer).maps


def shortcut_shares(maps: torch.Tensor, x: torch.Tensor, fields: list[EvalField], qc: QcTask) -> dict[str, list]:
    """Each map's share off the objects (the first plate.objects kind's labels, else the automatic
    foreground of qc.foreground_channel) and within the field border (engine/shares.py)."""
    h, w = x.shape[-2:]
    border = shares.border_mask((h, w), shares.border_margin((h, w), qc.border))
    off, edge = [], []
    for i, f in enumerate(fields):
        objects = (shares.object_mask(f.labels) if f.labels is not None
                   else shares.foreground_mask(x[i, qc.foreground_channel].cpu(), qc.polarity))
        m = maps[i : i + 1].detach().float().cpu()
        off.append(float(shares.region_shares(m, ~objects)[0]))
        edge.append(float(shares.region_shares(m, border)[0]))
    return {"share_off_objects": off, "share_border": edge}


def score_maps(model, x: torch.Tensor, target: torch.Tensor, maps: torch.Tensor,
           fields: list[EvalField]) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Per-image scores (NaN localisation where a field has no mask) and the mean curves."""
    h, w = x.shape[-2:]
    mask = torch.stack([f.mask if f.mask is not None else torch.zeros(h, w, dtype=torch.bool) for f in fields])
    mask = mask.to(maps.device)
    dele = metrics.perturbation_curve(model, x, maps, target, "deletion", fractions=DELETION_FRACTIONS)
    fine = metrics.perturbation_curve(model, x, maps, target, "deletion", fractions=FINE_DELETION_FRACTIONS)
    ins = metrics.perturbation_curve(model, x, maps, target, "insertion", substrate="blur",
                                     fractions=INSERTION_FRACTIONS)
    values = {
        "pointing_game": metrics.pointing_game(maps, mask),
        "pointing_game_3px": metrics.pointing_game(maps, mask, tolerance=3),
        "relevance_mass": metrics.relevance_mass(maps, mask),
        "rank_accuracy": metrics.rank_accuracy(maps, mask),
        "pixel_auroc": metrics.pixel_auroc(maps, mask),
        "deletion_auc": metrics.curve_auc(dele, DELETION_FRACTIONS),
        "fine_deletion_auc": metrics.curve_auc(fine, FINE_DELETION_FRACTIONS),
        "insertion_auc": metrics.curve_auc(ins, INSERTION_FRACTIONS),
        "sparseness": metrics.sparseness(maps),
        "prob_original": dele[:, 0],
    }
    scores = {k: v.float().cpu().tolist() for k, v in values.items()}
    curves = {"deletion": dele.mean(0).cpu().tolist(), "fine_deletion": fine.mean(0).cpu().tolist(),
              "insertion": ins.mean(0).cpu().tolist()}
    return scores, curves


def mean_table(scores: pd.DataFrame, methods: list[str]) -> pd.DataFrame:
    cols = [c for c in COLUMNS if c in scores.columns]
    table = scores.groupby("method", sort=False)[cols].mean()  # pandas' mean skips NaN
    table.insert(0, "maps", scores.groupby("method", sort=False).size())
    return table.loc[methods].reset_index()


def randomized_copy(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """A copy of the model with every parameter redrawn from N(0, std of that parameter) (Adebayo 2018).

    TorchScript modules are copied through a save / load round trip, others by deepcopy; the model
    passed in is not touched. Buffers (BatchNorm running statistics) are kept.
    """
    if isinstance(model, torch.jit.ScriptModule):
        buf = io.BytesIO()
        torch.jit.save(model, buf)
        buf.seek(0)
        clone = torch.jit.load(buf, map_location=next(iter(model.parameters()), torch.empty(0)).device)
    else:
        import copy

        clone = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in clone.parameters():
            std = float(p.std()) if p.numel() > 1 else 0.0
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
    return clone.eval()
