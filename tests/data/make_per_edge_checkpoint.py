"""Writes per_edge_checkpoint.pt.gz: a DARTS searcher's state in the per-edge supernet layout
(`cells.k.edges.j.ops.o`, one MixedOp per edge), then its parameters after one more search
step and the logits of the network in eval mode after it.

It must run against the code that wrote that layout (commit 53024d6 or older), e.g.
    git worktree add /tmp/old 53024d6
    PYTHONPATH=/tmp/old python tests/data/make_per_edge_checkpoint.py
tests/test_layout.py loads both states into today's supernet and checks that the step taken
from the first one ends at the second.
"""

import copy
import gzip
import io
from pathlib import Path
from typing import Any

import torch

from distsearch.search.darts import DartsSearcher
from search_spaces.darts import Supernet

SPACE = dict(in_channels=1, num_classes=3, C=2, layers=3, nodes=3, image_size=8)


def batch(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (4,), generator=g)


def to_float(state: Any) -> Any:
    """float64 tensors of a (nested) state as float32."""
    if isinstance(state, dict):
        return {k: to_float(v) for k, v in state.items()}
    return state.detach().float() if torch.is_tensor(state) and state.dtype == torch.float64 else state


if __name__ == "__main__":
    assert ".edges.0.ops." in "".join(Supernet(**SPACE).state_dict()), "run this against the per-edge layout"
    torch.manual_seed(0)
    model = Supernet(**SPACE).double()
    with torch.no_grad():  # alphas far from uniform, so that every op's weight matters
        for a in model.arch_parameters():
            a.normal_(0, 1)
    searcher = DartsSearcher(model, epochs=4, order="second", arch_lr=0.05)
    g = torch.Generator().manual_seed(1)
    batches = [(batch(g), batch(g)) for _ in range(3)]
    for train, val in batches[:2]:
        searcher.step(train, val)
    state, opts = searcher.state_dict(), (searcher.w_optimizer, searcher.a_optimizer)
    with torch.no_grad():  # stored in float32 (half the file), computed in float64 from the same values
        for t in [*state["model"].values(), *(v for o in opts for s in o.state.values() for v in s.values())]:
            if t.is_floating_point():
                t.copy_(t.float())
    before = to_float(copy.deepcopy(state))  # state_dict() holds the live tensors
    searcher.step(*batches[2])
    with torch.no_grad():
        searcher.model.eval()
        logits = searcher.model(batches[2][1][0])
    buf = io.BytesIO()
    torch.save(
        {
            "space": SPACE,
            "before": before,
            "after": to_float(dict(model.named_parameters())),
            "batch": batches[2],
            "eval_logits": logits,
        },
        buf,
    )
    path = Path(__file__).with_name("per_edge_checkpoint.pt.gz")
    path.write_bytes(gzip.compress(buf.getvalue(), 9, mtime=0))
    print(path, path.stat().st_size, "bytes")
