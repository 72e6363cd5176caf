"""TensorBoard pictures: image grids (LeaSE explanations, units) are titled and an inch a
picture, cell drawings and alpha heatmaps as wide as the figures that draw them."""

from __future__ import annotations

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from distsearch.monitor import Monitor
from distsearch.storage import Store
from search_spaces import Genotype


def test_image_grids_and_cells_read_back_at_a_readable_size(tmp_path, monkeypatch):
    from distsearch import plots

    drawn = []
    draw = plots.image_grid
    monkeypatch.setattr(
        plots, "image_grid", lambda imgs, title, **kw: drawn.append((imgs, title)) or draw(imgs, title, **kw)
    )
    store = Store(str(tmp_path / "run"))
    monitor = Monitor(store)
    monitor.image_grid("explain/delta", torch.randn(16, 1, 8, 8), 3)  # signed: rescaled into [0, 1]
    imgs, title = drawn[0]
    assert float(imgs.min()) == 0.0 and float(imgs.max()) == 1.0 and title.startswith("explain/delta at step 3")
    monitor.image_grid("units/mlp_unit7", torch.rand(1, 3, 12, 100), 0)  # one grid made already
    edges = [("sep_conv_3x3", 0), ("skip_connect", 1), ("dil_conv_3x3", 2), ("max_pool_3x3", 0)]
    monitor.genotype(Genotype(edges, (2, 3), edges, (2, 3)), 3)
    monitor.close()
    acc = EventAccumulator(store.path("tb"), size_guidance={"images": 0})
    acc.Reload()
    delta, units = acc.Images("explain/delta")[-1], acc.Images("units/mlp_unit7")[-1]
    assert delta.step == 3 and delta.width >= 750 and delta.height >= 200  # was 242 x 62
    assert units.width >= 750
    for kind in ("normal", "reduce"):
        assert acc.Images(f"cells/{kind}")[-1].width >= 500
