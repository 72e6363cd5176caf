"""Unit analysis (Szegedy et al. 2014, section 3): are single units more interpretable than
random directions? For a layer's activations φ(x) (flattened), the held-out images
x' = argmax_x ⟨φ(x), e_i⟩ (a single unit i) and x' = argmax_x ⟨φ(x), v⟩ (a random unit-norm
direction v), the top k of each, returned as image grids (C×H×W tensors) and saved as PNGs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from .attack_base import eval_mode


@dataclass
class UnitImages:
    unit: int  # the unit i (index into the flattened activation)
    unit_indices: torch.Tensor  # indices of the top-k images along e_i
    direction_indices: torch.Tensor  # indices of the top-k images along v
    unit_grid: torch.Tensor  # C×H×W image grid
    direction_grid: torch.Tensor

    def save(self, folder: str | os.PathLike[str], prefix: str = "units") -> list[str]:
        """Write <prefix>_unit<i>.png and <prefix>_direction.png, titled; returns their paths."""
        from ..plots import image_grid, save

        os.makedirs(folder, exist_ok=True)
        paths = [os.path.join(folder, f"{prefix}_unit{self.unit}.png"), os.path.join(folder, f"{prefix}_direction.png")]
        k = len(self.unit_indices)
        top = f"{prefix}: the top {k} held-out images along"
        titles = [f"{top} unit {self.unit}", f"{top} a random direction"]
        for grid, title, path in zip((self.unit_grid, self.direction_grid), titles, paths):
            save(image_grid(grid.unsqueeze(0), title), path)
        return paths


@torch.no_grad()
def activations(model: nn.Module, layer: str | nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """φ(x) at `layer` (a module or its name in model.named_modules()), flattened to N×D, eval mode."""
    if isinstance(layer, str):
        named = dict(model.named_modules())
        if layer not in named:
            raise ValueError(f"layer: no module named {layer!r}; choose one of {', '.join(n for n in named if n)}")
        layer = named[layer]
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda m, a, out: captured.append(out.detach().flatten(1)))
    try:
        with eval_mode(model):
            for i in range(0, x.shape[0], batch_size):
                model(x[i : i + batch_size])
    finally:
        handle.remove()
    return torch.cat(captured)


def unit_images(
    model: nn.Module,
    layer: str | nn.Module,
    x: torch.Tensor,
    k: int = 8,
    unit: int | None = None,
    seed: int = 0,
    nrow: int = 8,
) -> UnitImages:
    """Top-k held-out images along unit `unit` (default: the unit with the largest variance over x)
    and along a random direction drawn with `seed`."""
    from torchvision.utils import make_grid

    if not isinstance(k, int) or not 1 <= k <= x.shape[0]:
        raise ValueError(f"k: must be an integer in [1, {x.shape[0]}] (the number of images), got {k!r}")
    phi = activations(model, layer, x)
    d = phi.shape[1]
    if unit is None:
        unit = int(phi.var(0).argmax())
    if not isinstance(unit, int) or not 0 <= unit < d:
        raise ValueError(f"unit: must be an integer in [0, {d}) for this layer, got {unit!r}")
    v = torch.randn(d, generator=torch.Generator().manual_seed(seed)).to(phi)
    v = v / v.norm()
    top_unit = phi[:, unit].topk(k).indices
    top_dir = (phi @ v).topk(k).indices
    grid = lambda idx: make_grid(x[idx].detach().cpu(), nrow=nrow, padding=2, pad_value=1.0)
    return UnitImages(unit, top_unit, top_dir, grid(top_unit), grid(top_dir))
