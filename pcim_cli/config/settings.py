"""The environment variables that set pcim itself (not a plate.yaml key): one model, one policy.

| variable | what it sets | default |
|---|---|---|
| `PCIM_GRACE_SECONDS` | seconds running wells get to finish after SIGTERM / SIGINT | 60 |
| `PCIM_LOCK_STALE_S` | seconds without a heartbeat after which another host's run lock is abandoned | 900 |

Policy, the same for every variable here and for the `PCIM_<SECTION>__<KEY>` overrides of plate.yaml
keys (config/load.py): unset or empty means the default; a value that is set must be valid, else the
command ends with a ConfigError (exit 78) naming the variable, its value and an example, before anything
is written (`pcim explain` reads them in its preflight).

Variables of other tools that pcim honours where they belong: `DASK_SCHEDULER_ADDRESS` (compute.address,
config/load.py), `OMP_NUM_THREADS`, `SLURM_CPUS_PER_TASK` / `SLURM_CPUS_ON_NODE` (compute.threads: auto,
run/threads.py), `CUDA_VISIBLE_DEVICES` (local GPU workers, run/cluster.py), `NO_COLOR` (plain output).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pcim_cli.errors import ConfigError

__all__ = ["GRACE_ENV", "LOCK_STALE_ENV", "VARIABLES", "Settings", "read_settings"]

GRACE_ENV = "PCIM_GRACE_SECONDS"
LOCK_STALE_ENV = "PCIM_LOCK_STALE_S"


class Settings(BaseModel):
    """pcim's own settings from the environment (see the module docstring)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    grace_seconds: float = Field(60.0, ge=0, description="a number of seconds, zero or more")
    lock_stale_s: float = Field(15 * 60.0, gt=0, description="a number of seconds above zero")


#: field -> environment variable
VARIABLES = {"grace_seconds": GRACE_ENV, "lock_stale_s": LOCK_STALE_ENV}


def read_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """The settings from `environ` (default: this process's environment); ConfigError for a bad value."""
    environ = os.environ if environ is None else environ
    given = {key: environ[name].strip() for key, name in VARIABLES.items() if environ.get(name, "").strip()}
    try:
        return Settings(**given)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = str(err["loc"][0])
            name, field = VARIABLES[key], Settings.model_fields[key]
            problems.append(f"{name}={given[key]!r} is not {field.description}; e.g. {name}={field.default:g}")
        raise ConfigError("; ".join(problems)) from None
