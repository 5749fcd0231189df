"""`pcim evaluate`: how good are the maps? The scores of run/evaluate.py (`score_plate`), written as
tables (comparison.{md,csv,json}, scores.csv) and plots (curves.png, overlays.png). Returns an
`Evaluation` (data; the CLI prints it).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pcim_cli.config import RunConfig
from pcim_cli.engine.pcim import PcimOptions
from pcim_cli.engine.verdict import Verdict
from pcim_cli.errors import ConfigError
from pcim_cli.run.evaluate import (
    COLUMNS,
    DELETION_FRACTIONS,
    DIRECTIONS,
    EXAMPLES_MAX,
    FINE_DELETION_FRACTIONS,
    INSERTION_FRACTIONS,
    EvalField,
    score_plate,
)

__all__ = ["EXAMPLES", "Evaluation", "evaluate", "markdown_table", "pyplot"]

EXAMPLES = 3  # fields shown in overlays.png


@dataclass
class Evaluation:
    """What `evaluate` measured and where it wrote it."""

    out: Path
    table: pd.DataFrame  # one row per method: mean scores
    scores: pd.DataFrame  # one row per (method, field): the scores of each map
    files: dict[str, Path] = field(default_factory=dict)
    fields: list[str] = field(default_factory=list)  # "A01 s1", the fields scored
    intensity_channel: str | None = None  # the channel of the intensity maps (auto: chosen here)
    verdicts: list[Verdict] = field(default_factory=list)  # the stain verdict, per target class


def pyplot():
    """matplotlib.pyplot (Agg); ConfigError naming the extra to install without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("pcim evaluate draws its plots with matplotlib, which is not installed: "
                          "pip install 'pcim-cli[evaluate]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def evaluate(cfg: RunConfig, masks: str, methods: Sequence[str] | None = None,
             wells: int | Sequence[str] | None = None, out: Path | None = None, sanity: bool = True,
             seed: int = 0) -> Evaluation:
    """Score every method's maps against the masks (run/evaluate.py `score_plate`: the arguments) and
    write the tables and plots to `out` (default `<csv folder>/<plate>_evaluate/`)."""
    plt = pyplot()  # before the work: without matplotlib, fail at once
    scored = score_plate(cfg, masks, methods, wells, sanity, seed)
    comp, fields = scored.comparison, scored.fields
    out = Path(out) if out is not None else Path(cfg.output.csv).parent / f"{cfg.plate.name}_evaluate"
    out.mkdir(parents=True, exist_ok=True)
    result = Evaluation(out=out, table=comp.table, scores=comp.scores, fields=[f"{f.well} s{f.site}" for f in fields],
                        intensity_channel=comp.intensity_channel, verdicts=comp.verdicts)
    result.files = _write(result, cfg, masks, scored.methods, scored.opts, comp.curves, sanity,
                          scored.explainer_sha256)
    result.files.update(_plots(plt, out, fields, scored.x, comp.maps_shown, comp.curves))
    return result


def _fmt(v: float) -> str:
    return "–" if v != v else f"{v:.3f}"


def markdown_table(table: pd.DataFrame) -> str:
    """The comparison as a markdown table, the best value of each score in bold, arrows for direction."""
    cols = [c for c in COLUMNS if c in table.columns]
    arrows = {"higher": " ↑", "lower": " ↓"}
    head = "| method | maps | " + " | ".join(COLUMNS[c] + arrows.get(DIRECTIONS[c], "") for c in cols) + " |"
    lines = [head, "|---" * (len(cols) + 2) + "|"]
    best = {}
    for c in cols:
        s = table[c].round(3)
        best[c] = s.max() if DIRECTIONS[c] == "higher" else s.min() if DIRECTIONS[c] == "lower" else None
    for _, row in table.iterrows():
        cells = []
        for c in cols:
            v = row[c]
            text = _fmt(v)
            cells.append(f"**{text}**" if v == v and round(v, 3) == best[c] and c != "s_per_map" else text)
        lines.append(f"| {row['method']} | {int(row['maps'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _write(result: Evaluation, cfg: RunConfig, masks: str, methods: list[str], opts: PcimOptions,
           curves: dict, sanity: bool, explainer_sha256: str | None = None) -> dict[str, Path]:
    out = result.out
    files = {"csv": out / "comparison.csv", "json": out / "comparison.json", "md": out / "comparison.md",
             "scores": out / "scores.csv"}
    result.table.to_csv(files["csv"], index=False)
    result.scores.to_csv(files["scores"], index=False)
    channel = result.intensity_channel
    doc = {
        "plate": cfg.plate.name, "masks": masks, "methods": methods, "fields": result.fields,
        "settings": dataclasses.asdict(opts), "target": cfg.explain.target, "explainer_sha256": explainer_sha256,
        "deletion_fractions": DELETION_FRACTIONS.tolist(),
        "fine_deletion_fractions": FINE_DELETION_FRACTIONS.tolist(),
        "insertion_fractions": INSERTION_FRACTIONS.tolist(),
        "directions": {c: DIRECTIONS[c] for c in COLUMNS}, "sanity_check": sanity,
        "intensity_channel": result.intensity_channel, "verdicts": [v.to_dict() for v in result.verdicts],
        "table": json.loads(result.table.to_json(orient="records")), "curves": curves,
    }
    files["json"].write_text(json.dumps(doc, indent=1, default=str))
    files["md"].write_text(
        f"# How good are the maps? — plate {cfg.plate.name}\n\n"
        f"{len(result.fields)} fields ({', '.join(result.fields[:12])}{' …' if len(result.fields) > 12 else ''}), "
        f"masks `{masks}`, target `{cfg.explain.target}`.\n\n"
        + markdown_table(result.table)
        + "".join(f"\n\n**Verdict ({v.target})**: {v.sentence}." for v in result.verdicts)
        + (f"\n\n`intensity` shows the {channel} channel (intensity_channel auto: the channel whose intensity "
           f"deletes the target class fastest here; set explain.intensity_channel: {channel} to use it in pcim "
           "explain)." if channel and "intensity" in methods else "")
        + "\n\n↑ higher is better, ↓ lower is better; best in bold. pointing: the map's maximum inside the mask "
        "(3px: within 3 px); mass: share of the map inside the mask; rank acc.: share of the top-|mask| "
        "pixels inside it; deletion: p(target) as the top 0-20% of pixels go to the channel mean (0.5% steps); "
        "deletion 2%: the same over the top 0-2% (0.1% steps); intensity / contrast: maps without a model (a "
        "channel's intensity; |x - channel mean| over all channels); "
        "insertion: p(target) as pixels are revealed on a blurred field; Gini: sparseness; rand. ρ: Spearman "
        "correlation with the map of the same method on a model with randomised parameters, over the pixels "
        "where either map is non-zero (sanity check, Adebayo et al. 2018; near 0 = the map depends on what "
        "the model learned). With plate.objects (first kind): obj. AUROC share / ΔP: per field with positive "
        "objects (at least half inside the mask) and others, the AUROC of the object's share of the map / of the drop "
        "of p(target) when it alone is deleted (ΔP does not depend on the map), averaged over fields; top-k ΔP: the "
        "drop when the map's top explain.top_objects objects are deleted together.\n"
    )
    return files


def _plots(plt, out: Path, fields: list[EvalField], x: torch.Tensor, maps: dict[str, torch.Tensor],
           curves: dict) -> dict[str, Path]:
    files = {"curves": out / "curves.png", "overlays": out / "overlays.png"}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    panels = (("fine_deletion", FINE_DELETION_FRACTIONS), ("deletion", DELETION_FRACTIONS),
              ("insertion", INSERTION_FRACTIONS))
    for ax, (kind, fr) in zip(axes, panels, strict=True):
        for method, c in curves.items():
            ax.plot(fr.numpy(), c[kind], label=method)
        ax.set_xlabel("share of pixels " + ("revealed" if kind == "insertion" else "removed (most relevant first)"))
        ax.set_ylabel("mean p(target)")
        ax.set_title(f"{kind.replace('_', ' ')} ({'higher' if kind == 'insertion' else 'lower'} is better)")
        ax.set_ylim(0, 1.02)
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(files["curves"], dpi=100)
    plt.close(fig)

    shown = [i for i, f in enumerate(fields[:EXAMPLES_MAX]) if f.mask is not None and bool(f.mask.any())][:EXAMPLES]
    shown = shown or list(range(min(EXAMPLES, len(fields))))
    cols = 1 + len(maps)
    fig, axes = plt.subplots(len(shown), cols, figsize=(2.2 * cols, 2.3 * len(shown)), squeeze=False)
    for r, i in enumerate(shown):
        img = x[i, :3].cpu().permute(1, 2, 0).numpy()
        img = np.concatenate([img, np.zeros((*img.shape[:2], 3 - img.shape[2]), img.dtype)], 2)
        axes[r, 0].imshow(img.clip(0, 1))
        axes[r, 0].set_title(f"{fields[i].well} s{fields[i].site}", fontsize=8)
        for k, (method, m) in enumerate(maps.items(), start=1):
            axes[r, k].imshow(m[i].numpy(), cmap="magma")
            if r == 0:
                axes[r, k].set_title(method, fontsize=8)
        for ax in axes[r]:
            if fields[i].mask is not None:
                ax.contour(fields[i].mask.numpy().astype(float), levels=[0.5], colors="cyan", linewidths=0.6)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(files["overlays"], dpi=100)
    plt.close(fig)
    return files
