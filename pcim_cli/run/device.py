"""The device a process fits on: models and explainers loaded once (a bounded cache), the channels-last
probe, one out-of-memory back-off, and the peak memory a record reports.

- `model(...)` / `explainer(...)`: a model file is loaded and probed once per process and device while
  it is among the `CACHE_SIZE` most recently used (the plates of a screen, the wells a worker runs); the
  key is the file's sha256, so a file replaced by another is loaded again.
- `fast_forward(...)`: the model behind the speed levers a task asks for; channels-last is kept only
  when the model gives the same logits with NHWC inputs (probed once per model and device).
- `BatchSize` / `with_backoff(...)`: compute.batch_size, halved for the rest of the well each time a
  call runs out of memory, with one warning; a PcimError naming the fix when even one image does not fit.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Generic, TypeVar

import torch

from pcim_cli.engine.pcim import FastForward, Forward
from pcim_cli.errors import PcimError
from pcim_cli.io.explainer import LoadedExplainer, load_explainer
from pcim_cli.io.model import LoadedModel, file_sha256, load_model

__all__ = ["CACHE_SIZE", "EXPLAINERS", "LRU", "MODELS", "MODEL_ERRORS", "BatchSize", "explainer", "fast_forward",
           "is_out_of_memory", "model", "model_key", "peak_memory_mib", "same_with_channels_last", "with_backoff"]

logger = logging.getLogger(__name__)

#: models (and explainers) a process keeps loaded; the least recently used goes first
CACHE_SIZE = 4
#: what a model that fails on its input raises (TorchScript's own error is no RuntimeError)
MODEL_ERRORS = (RuntimeError, ValueError, MemoryError, torch.jit.Error)

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
T = TypeVar("T")
_Loaded = TypeVar("_Loaded", LoadedModel, LoadedExplainer)


class LRU(Generic[K, V]):
    """A small least-recently-used cache."""

    def __init__(self, size: int):
        self.size = size
        self.items: collections.OrderedDict[K, V] = collections.OrderedDict()

    def get(self, key: K, make: Callable[[], V]) -> V:
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        value = make()
        self.items[key] = value
        while len(self.items) > self.size:
            self.items.popitem(last=False)
        return value


#: this process's models, by `model_key`, and explainers, by (sha256, device)
MODELS: LRU[tuple, LoadedModel] = LRU(CACHE_SIZE)
EXPLAINERS: LRU[tuple, LoadedExplainer] = LRU(CACHE_SIZE)
_CHANNELS_LAST: dict[tuple[str, str], bool] = {}  # (model sha256, device) -> same logits with NHWC inputs


def model(path: str | Path, n_channels: int, input_size: tuple[int, int] | None, device: str,
          sha256: str | None = None, probe_size: tuple[int, int] = (64, 64)) -> LoadedModel:
    """io/model.py `load_model`, once per file contents, channels, input size and device (see the module).
    `sha256`: the digest the driver planned with (a worker skips hashing the file again); `probe_size`: the
    size an any-size model is probed at (a bioimage.io package's size rule may exclude 64 x 64)."""
    if not Path(path).is_file():  # load_model says what is missing and how to fix it (78)
        return load_model(path, n_channels, input_size, device=device, probe_size=probe_size)
    sha = sha256 or file_sha256(path)
    loaded = MODELS.get(model_key(sha, n_channels, input_size, device, probe_size),
                        lambda: load_model(path, n_channels, input_size, device=device, sha256=sha,
                                           probe_size=probe_size))
    return _at(loaded, path)


def _at(loaded: _Loaded, path: str | Path) -> _Loaded:
    """The cached object, named by the file asked for: the same contents may sit at several paths (each
    plate folder with its copy of the model), and a task must name a file that exists, not the first one
    loaded (which may since have been moved or deleted)."""
    return loaded if loaded.path == Path(path) else dataclasses.replace(loaded, path=Path(path))


def model_key(sha256: str, n_channels: int, input_size: tuple[int, int] | None, device: str,
              probe_size: tuple[int, int] = (64, 64)) -> tuple:
    """The cache key of a model: the file's contents and what it was probed with."""
    if input_size is not None:
        return sha256, n_channels, tuple(input_size), device
    return sha256, n_channels, None, device, tuple(probe_size)


def explainer(path: str | Path, device: str, sha256: str | None = None, hint: str = "plate.yaml") -> LoadedExplainer:
    """io/explainer.py `load_explainer`, once per file contents and device. With `sha256` (what the driver
    checked), a file that changed since is a PcimError: the run was planned with the other one."""
    if not Path(path).is_file():  # load_explainer says what is missing and how to train one (78)
        return load_explainer(path, device=device, hint=hint)
    loaded = _at(EXPLAINERS.get((sha256 or file_sha256(path), device),
                                 lambda: load_explainer(path, device=device, hint=hint)), path)
    if sha256 is not None and loaded.sha256 != sha256:
        raise PcimError(f"the explainer {path} changed during the run (sha256 {loaded.sha256}, planned with "
                        f"{sha256}); rerun pcim explain")
    return loaded


# --------------------------------------------------------------------------------------------------
# speed levers


def same_with_channels_last(module: Forward, x: torch.Tensor) -> bool:
    """Does the model give the same logits for the image x (C, H, W) in NHWC memory format?"""
    with torch.no_grad():
        ref = module(x[None])
        try:
            got = module(x[None].contiguous(memory_format=torch.channels_last))
        except Exception as exc:  # noqa: BLE001 - any failure means: keep NCHW
            logger.info("model does not take channels-last inputs (%s); using NCHW", type(exc).__name__)
            return False
    same = got.shape == ref.shape and torch.allclose(got.float(), ref.float(), rtol=1e-4, atol=1e-5)
    if not same:
        logger.info("model gives other logits with channels-last inputs; using NCHW")
    return bool(same)


def fast_forward(loaded: LoadedModel, x: torch.Tensor, device: str, precision: str = "float32",
                 channels_last: bool = True) -> Forward:
    """The model behind the speed levers asked for: reduced `precision` (autocast), and `channels_last`
    when the model gives the same logits with NHWC inputs, probed on the image x (C, H, W) once per
    process, model and device."""
    use_nhwc = False
    if channels_last:
        key = (loaded.sha256, device)
        if key not in _CHANNELS_LAST:
            _CHANNELS_LAST[key] = same_with_channels_last(loaded.module, x.to(device))
        use_nhwc = _CHANNELS_LAST[key]
    if not use_nhwc and precision == "float32":
        return loaded.module
    return FastForward(loaded.module, precision, use_nhwc)


# --------------------------------------------------------------------------------------------------
# out of memory


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's out-of-memory error, also when a TorchScript model re-raises it in its own error."""
    oom = getattr(torch, "OutOfMemoryError", None)
    if isinstance(exc, MemoryError) or (oom is not None and isinstance(exc, oom)):
        return True
    text = str(exc).lower()
    return isinstance(exc, (RuntimeError, torch.jit.Error)) and (
        "out of memory" in text or "can't allocate memory" in text)


def _empty_cache(device: str) -> None:
    """Give the blocks of the failed attempt back to the GPU before the retry."""
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()


class BatchSize:
    """compute.batch_size, halved for the rest of the well each time a call runs out of memory."""

    def __init__(self, value: int, device: str, where: str):
        self.configured = self.value = value
        self.device, self.where = device, where
        self.warned = False

    def shrink(self, tried: int) -> None:
        """After an out-of-memory error at `tried` images: halve, or raise once at 1."""
        if tried <= 1:
            raise PcimError(
                f"{self.where}: out of memory on {self.device} even with one image per batch "
                f"(compute.batch_size: {self.configured} was halved down to 1); use a device with "
                "more memory or a smaller model.input_size"
            )
        self.value = max(1, tried // 2)
        _empty_cache(self.device)
        log = logger.debug if self.warned else logger.warning
        log("%s: out of memory with %d images per batch on %s; retrying with %d "
            "(set compute.batch_size: %d or lower to skip the retries)",
            self.where, tried, self.device, self.value, self.value)
        self.warned = True


def with_backoff(call: Callable[[int], T], batch: BatchSize) -> T:
    """`call(batch size)`, again with half the batch after each out-of-memory error (BatchSize.shrink)."""
    while True:
        try:
            return call(batch.value)
        except MODEL_ERRORS as exc:
            if not is_out_of_memory(exc):
                raise
            batch.shrink(batch.value)


# --------------------------------------------------------------------------------------------------
# what a record reports


def peak_memory_mib(device: str = "cpu") -> dict[str, float | None]:
    """Peak resident memory of this process and, on CUDA, peak memory allocated by torch (MiB).

    Linux: VmHWM of /proc/self/status (the getrusage peak would include a forking parent's memory);
    elsewhere getrusage where it exists.
    """
    rss = None
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                rss = round(int(line.split()[1]) / 1024, 1)  # kB
    except OSError:
        try:
            import resource

            rss = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux
        except ImportError:  # Windows
            pass
    cuda = None
    if device.startswith("cuda") and torch.cuda.is_available():
        cuda = round(torch.cuda.max_memory_allocated(torch.device(device)) / 2**20, 1)
    return {"rss": rss, "cuda": cuda}
