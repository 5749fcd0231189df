"""`pcim init`: a commented plate.yaml to start from (every key of shared/DESIGN.md §3.1)."""

from __future__ import annotations

from pathlib import Path

from pcim_cli.errors import OutputError

TEMPLATE = """\
# plate.yaml for pcim — fill in the marked lines, then: pcim validate {name}
# Relative paths resolve against this file's folder (never the working directory), so cron and
# sbatch runs behave like runs by hand. Unknown keys are errors. Override any key without editing:
#   PCIM_EXPLAIN__STEPS=100 pcim explain {name}      or      pcim explain {name} --set explain.steps=100
plate:
  name: null                        # Metadata_Plate in the CSV; null: this file's name without .yaml
  images: images/                   # FILL IN: the folder with the TIFFs, or an OME-Zarr HCS plate (plate.zarr:
      # NGFF 0.4 / 0.5; wells and fields from its metadata, channels by their omero labels; pattern unused)
  pattern: "{{well}}_s{{field}}_w{{channel}}*.tif"
      # tokens: {{well}} (A1, A01, A001 all accepted) or {{row}} and {{col}}; {{field}}; {{channel}};
      # '*' matches anything (vendor GUIDs). Without {{channel}}, each file is one multi-channel stack
      # (TIFF pages, or an OME-TIFF / ImageJ hyperstack with a C axis; a Z axis is max-projected).
  channels: {{DNA: "1", PH3: "2", Actin: "3"}}
      # FILL IN: the model's input channels in order; name -> the {{channel}} token in file names
      # (a plain list [DNA, PH3, Actin] when file names carry the names themselves, or for an OME-Zarr plate
      # its channel labels; {{DNA: 0}}: 0-based channel index of a store without labels)
  layout: null                      # optional CSV/TSV plate map: a 'well' column + annotation columns
  wells: null                       # optional subset, e.g. [A01, B03]
  timepoint: null                   # time series (OME-TIFF / OME-Zarr T axis): the time point to read, from 0
  objects: null                     # optional label images (0 = background, 1..N = objects) -> per-object
      # tables {{plate}}_pcim_<Object>.csv, e.g. {{Nuclei: "labels/{{well}}_s{{field}}_nuclei.tif"}} (tokens as pattern)
model:
  path: classifier.ts               # FILL IN: TorchScript (.ts, .pt), torch.export archive (.pt2), or a
      # bioimage.io model package (.zip or rdf.yaml; pip install 'pcim-cli[bioimageio]'): its weights, and
      # classes, input_size and normalize when the keys below are left out (a key that disagrees: exit 78)
  classes: null                     # output names in order, e.g. [negative, mitotic]; null: "0", "1", ...
  input_size: null                  # [H, W] the model needs (fields are tiled to it); null: whole fields
  aggregate: mean-logit             # a tiled field's prediction: mean-logit | mean-prob | max | whole-field
  normalize: {{method: percentile, low: 1.0, high: 99.8}}
      # per channel and field, as in training; or {{method: fixed, min: 0, max: 4095}}, {{method: zscore}},
      # {{method: none}}; percentile and fixed clip to [0, 1] unless clip: false
  override_package: []              # a bioimage.io package: keys of yours that win over it (normalize,
      # channels, classes, input_size)
explain:
  method: pcim                      # pcim | pcim-amortised | saliency | integrated-gradients | occlusion | rise
                                    #   | intensity | contrast
  target: predicted                 # predicted | a class name | layout:<column> | all
  explainer: null                   # pcim-amortised: the file `pcim train-explainer plate.yaml --out …` wrote
  refine_steps: 0                   # pcim-amortised: per-image fit steps continued from the explainer's maps
  steps: 49                         # optimisation steps per map (x 2 images + 1 gradient pass = 99 passes)
  lr: 0.3
  schedule: constant                # learning rate over the steps: constant | cosine | step
  init: gradient                    # first mixing logits: gradient (input gradient) | zero
  per_channel: false                # true: one map per input channel instead of one shared map
  seed: 0
  fidelity: true                    # deletion / insertion AUC of every map into the CSV
  top_objects: 3                    # plate.objects: top objects per field deleted together and outlined
  tile_maps: field                  # tiled fields: one map over the field | per-tile | evidence
  adaptive_budget: null             # e.g. 0.32: grow the budget until deleting the map removes the class
compute:
  cluster: local                    # none | local | address | scheduler-file | slurm
  address: null                     # cluster: address (tcp://host:8786; or DASK_SCHEDULER_ADDRESS)
  scheduler_file: null              # cluster: scheduler-file
  workers: auto                     # local: one per visible GPU, else 1
  device: auto                      # auto | cpu | cuda | cuda:<index>
  batch_size: 16                    # images (fields or tiles) fitted together on one device
  threads: auto                     # torch threads per process: auto (the CPUs it may use; 1 when faster) | N
  channels_last: true               # NHWC inputs when the model gives the same logits with them (faster)
  precision: float32                # bfloat16 / float16: faster on GPUs, maps change slightly
  slurm:                            # cluster: slurm (dask-jobqueue SLURMCluster), one worker per job
    queue: null
    account: null
    walltime: "01:00:00"
    cores: 4
    memory: 16GB
    gpus: 1                         # per job
    jobs: 1
    job_extra: []                   # extra #SBATCH directives, e.g. ["--qos=high"]
output:
  zarr: out/{{plate}}.zarr          # OME-Zarr HCS store of the maps
  csv: out/{{plate}}_pcim.csv       # one row per (well, field, target)
  format: "0.5"                     # OME-NGFF 0.5 (Zarr v3) or "0.4" (Zarr v2)
  screen_csv: null                  # several plates in one command: every plate's rows in one CSV
"""


def write_template(path: Path, overwrite: bool = False) -> Path:
    """Write the commented template to `path`; refuses to replace an existing file unless `overwrite`."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputError(f"{path} exists; choose another name or pass --force to replace it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(TEMPLATE.format(name=path.name), encoding="utf-8")
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc}; choose a writable folder") from exc
    return path
