"""TensorBoard for searches and training runs: scalars, learning rates, alpha entropy,
alpha heatmaps, drawings of the derived cells, the genotype as text, image grids and
hparams. Event files live next to the checkpoints (<store>/tb); for a remote store they
are written to a local folder and mirrored to the store at every checkpoint (`sync`).
"""

from __future__ import annotations

import math
import shutil
import tempfile
from typing import Any

import torch
from torch.utils.tensorboard import SummaryWriter

from search_spaces import Genotype

from . import plots
from .storage import Store

TB_DIR = "tb"
GRID_NOTES = {  # what an image grid's tag shows, for its title
    "explain/x": "LeaSE: the explainer's inputs x",
    "explain/delta": "LeaSE: the explanation δ = PGD(E', A), per image rescaled (grey = 0)",
    "explain/weighted": "LeaSE: the audience's input, x weighted by δ (per image rescaled)",
    "units/": "held-out images with the largest activation along the direction (left to right)",
}


class Monitor:
    def __init__(self, store: Store | None = None, enabled: bool = True, purge_step: int | None = None):
        self.store, self.enabled = store, enabled
        self._tmp: str | None = None
        if not enabled:
            self.writer = None
            return
        if store is not None and store.is_local:
            self.log_dir = store.path(TB_DIR)
        else:
            self._tmp = self.log_dir = tempfile.mkdtemp(prefix="distsearch-tb-")
        self.writer = SummaryWriter(self.log_dir, purge_step=purge_step, flush_secs=30)

    def scalars(self, values: dict[str, Any], step: int) -> None:
        if self.writer is None:
            return
        for k, v in values.items():
            v = float(v)
            if math.isfinite(v):
                self.writer.add_scalar(k, v, step)

    def architecture(self, model: torch.nn.Module, step: int, images: bool = True) -> None:
        """alpha entropy (scalars) and, when `images`, alpha heatmaps and cell drawings."""
        if self.writer is None or not hasattr(model, "arch_weights"):
            return
        for kind, w in zip(("normal", "reduce"), model.arch_weights()):
            w = w.detach().float().cpu()
            entropy = -(w * w.clamp_min(1e-12).log()).sum(-1).mean()
            self.writer.add_scalar(f"alpha/entropy_{kind}", float(entropy), step)
            if images:
                fig = plots.alpha_heatmap(w.numpy(), list(model.ops), f"softmax(alpha_{kind}) at epoch {step}")
                self.writer.add_image(f"alpha/{kind}", plots.to_rgb(fig), step, dataformats="HWC")
        if images:
            self.genotype(model.derive(), step)

    def genotype(self, genotype: Genotype, step: int) -> None:
        if self.writer is None:
            return
        self.writer.add_text("genotype", f"```\n{genotype.to_json()}\n```", step)
        for reduce in (False, True):
            img = plots.to_rgb(plots.draw_cell(genotype, reduce))
            self.writer.add_image(f"cells/{'reduce' if reduce else 'normal'}", img, step, dataformats="HWC")

    def image_grid(self, tag: str, images: torch.Tensor, step: int, nrow: int = 8) -> None:
        """Up to two rows of `images` (N×C×H×W; signed maps rescaled into [0, 1]) as a titled
        picture, each image about an inch wide."""
        if self.writer is None:
            return
        imgs = images.detach().float().cpu()[: nrow * 2]
        lo, hi = imgs.amin(), imgs.amax()
        if lo < 0 or hi > 1:  # signed maps such as perturbations: rescale to [0, 1]
            imgs = (imgs - lo) / (hi - lo).clamp_min(1e-12)
        title = f"{tag} at step {step}"
        note = next((v for k, v in GRID_NOTES.items() if tag.startswith(k)), "")
        fig = plots.image_grid(imgs, f"{title}\n{note}" if note else title, nrow=nrow)
        self.writer.add_image(tag, plots.to_rgb(fig), step, dataformats="HWC")

    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        if self.writer is None:
            return
        clean = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()}
        self.writer.add_hparams(clean, {f"hparam/{k}": float(v) for k, v in metrics.items()}, run_name="hparams")

    def sync(self) -> None:
        """Flush event files; for a remote store copy them there."""
        if self.writer is None:
            return
        self.writer.flush()
        if self._tmp is not None and self.store is not None:
            self.store.upload_dir(self._tmp, TB_DIR)

    def close(self) -> None:
        if self.writer is None:
            return
        self.sync()
        self.writer.close()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
        self.writer = None
