"""Toy classifiers whose evidence is known by hand, shared by the engine, schedule, baseline and explainer tests.

`BlockReader` reads one block of one channel and nothing else: its logits are (-s, s) with

    s = scale * (mean of the channel inside the block [- its mean over the image] - offset)

so a correct map puts its mass on that block. Each test picks the geometry and offset its images need;
the model is real torch (scriptable, with a parameter), called only forward and through its input gradient.
"""

from __future__ import annotations

import torch

#: the block of the default BlockReader: rows 8-15, columns 20-27
BLOCK = (slice(8, 16), slice(20, 28))


class BlockReader(torch.nn.Module):
    """Logits (-s, s) from one block of one channel (see the module docstring)."""

    def __init__(self, block: tuple[slice, slice] = BLOCK, channel: int = 1, scale: float = 4.0,
                 offset: float = 0.0, relative: bool = True):
        super().__init__()
        self.y0, self.y1, self.x0, self.x1 = block[0].start, block[0].stop, block[1].start, block[1].stop
        self.channel, self.offset, self.relative = channel, offset, relative
        self.scale = torch.nn.Parameter(torch.tensor(scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inside = x[:, self.channel, self.y0 : self.y1, self.x0 : self.x1].mean(dim=(1, 2))
        if self.relative:
            inside = inside - x[:, self.channel].mean(dim=(1, 2))
        s = self.scale * (inside - self.offset)
        return torch.stack([-s, s], dim=1)


def scripted(model: torch.nn.Module) -> torch.jit.ScriptModule:
    """The model as TorchScript in eval mode (what a user exports), without torch's deprecation warning."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.script(model.eval())


def block_mass(maps: torch.Tensor, block: tuple[slice, slice] = BLOCK) -> torch.Tensor:
    """Share of each map (B, M, H, W), summed over M, that lies on the block."""
    m = maps.sum(1)
    return m[:, block[0], block[1]].sum(dim=(1, 2)) / m.sum(dim=(1, 2)).clamp(min=1e-12)


def toy_images(b: int = 4, seed: int = 0) -> torch.Tensor:
    """Dim noise with the block bright in channel 1 (the evidence of class 1)."""
    g = torch.Generator().manual_seed(seed)
    x = 0.2 * torch.rand(b, 3, 32, 32, generator=g)
    x[:, 1, BLOCK[0], BLOCK[1]] += 0.8  # bright evidence in channel 1
    return x
