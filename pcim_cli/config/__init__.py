"""plate.yaml: the sections as pydantic models, how a file and its overrides become one `RunConfig`, the
environment settings, `pcim init`'s template and screens of several plates.

Torch-free (an import-linter contract checks it): reading a plate.yaml, `pcim schema` and every
configuration error come back without loading torch.

- config/sections.py: `RunConfig` and its sections; config/explain.py: `explain:`, derived from the engine's
  options (engine/options.py);
- config/load.py: `load_config` (precedence: defaults < YAML < PCIM_* environment < --set);
- config/settings.py: the environment variables that are not plate.yaml keys (PCIM_GRACE_SECONDS, ...);
- config/template.py: `pcim init`'s commented template, derived from the models;
- config/screen.py: several plates in one command.
"""

from pcim_cli.config.base import ConfigPath
from pcim_cli.config.explain import ExplainConfig
from pcim_cli.config.load import ENV_PREFIX, config_from_data, load_config, path_keys
from pcim_cli.config.sections import (
    DASK_ADDRESS,
    ComputeConfig,
    ModelConfig,
    Normalize,
    NormalizeFixed,
    NormalizeNone,
    NormalizePercentile,
    NormalizeZscore,
    OutputConfig,
    PlateConfig,
    RunConfig,
    SlurmConfig,
)

__all__ = ["DASK_ADDRESS", "ENV_PREFIX", "ComputeConfig", "ConfigPath", "ExplainConfig", "ModelConfig", "Normalize",
           "NormalizeFixed", "NormalizeNone", "NormalizePercentile", "NormalizeZscore",
           "OutputConfig", "PlateConfig", "RunConfig",
           "SlurmConfig", "config_from_data", "load_config", "path_keys"]
