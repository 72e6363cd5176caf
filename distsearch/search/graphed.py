"""A whole search step captured in one CUDA graph and replayed (../shared/DESIGN.md, "Fast from
day one": a first-order DARTS step at the paper size on an H100, 286 ms eager, 197 ms replayed;
the reference code's 569 ms step took 266 ms captured whole; docs/NOTES.md).

A step is the same kernels on same-shaped batches with no host sync (tests/test_no_host_sync.py),
so it is recorded once and replayed:
- Warm-up: `warmup` steps run eagerly on a deep copy of the searcher (cuDNN plans, autograd's
  device threads, lazy optimiser state), then the copy is dropped and the RNG states are put
  back. The real searcher's optimiser states are created as lazy initialisation would create
  them (zeros; an SGD momentum buffer of zeros gives bitwise the first step's clone of the
  gradient), so the captured step is the steady-state step and every real step is a replay.
- Capture: Adam needs `capturable=True` (its step count lives on the device). The Python
  numbers a step reads (the learning rates; DARTS's second order reads the weight lr as xi)
  are baked into the graph, so any change of an optimiser's lr (the cosine schedule at each
  epoch end, a PBT mutation) triggers a new capture. Capturing runs nothing: each step,
  the batches are copied into the captured inputs, the graph is replayed and the metrics
  are cloned out.
- Refused: weight strategies that rebind tensors carried from one step to the next (FreeAT's
  delta: `graph_safe = False`), and CPU devices.
`capture=False` runs the same warm-up, staging and re-capture logic eagerly (each "replay" is
a plain step on the staged inputs): tests/test_graphed.py checks on the CPU that it equals
plain steps bitwise. On a GPU, benchmarks/gpu_check.sh times it and runs graphed searches
through the runner beside eager ones (docs/NOTES.md, sixteenth session: an H200).
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable

import torch

from .base import Batch, Searcher


def make_capturable(searcher: Searcher) -> None:
    """Adam-style optimisers keep their step count on the parameters' device."""
    for opt in searcher._optimisers().values():
        for group in opt.param_groups:
            if "capturable" in group:
                group["capturable"] = True
                for p in group["params"]:
                    step = opt.state.get(p, {}).get("step")
                    if isinstance(step, torch.Tensor):
                        opt.state[p]["step"] = step.to(p.device, torch.float32)


def _init_states_like(searcher: Searcher, warmed: Searcher) -> None:
    """Zero optimiser states shaped as `warmed`'s, for parameters that have none yet."""
    for name, opt in searcher._optimisers().items():
        other = warmed._optimisers()[name]
        params = [p for g in opt.param_groups for p in g["params"]]
        twins = [p for g in other.param_groups for p in g["params"]]
        for p, q in zip(params, twins, strict=True):
            if opt.state.get(p) or not other.state.get(q):
                continue
            opt.state[p] = {
                k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else v for k, v in other.state[q].items()
            }


class GraphedStep:
    """Callable like `searcher.step`, replaying one captured CUDA graph per learning-rate setting."""

    def __init__(self, searcher: Searcher, warmup: int = 3, capture: bool = True):
        device = next(searcher.model.parameters()).device
        if capture and device.type != "cuda":
            raise ValueError(f"cuda_graph: needs the search on a CUDA device, not {device.type}")
        strategy = getattr(searcher, "weight_strategy", None)
        if strategy is not None and not getattr(strategy, "graph_safe", True):
            raise ValueError(
                f"cuda_graph: weight strategy {type(strategy).__name__} carries tensors across steps; "
                "not supported in a CUDA graph (set cuda_graph: false)"
            )
        self.searcher, self.warmup, self.device, self.capture = searcher, warmup, device, capture
        self.graph: torch.cuda.CUDAGraph | None = None
        self._replay: Callable[[], None] | None = None
        self.key: tuple | None = None
        self.inputs: list[torch.Tensor] = []
        self.outputs: dict[str, torch.Tensor] = {}
        self.captures = 0
        self._warmed = False
        self.pool = None
        if capture:
            make_capturable(searcher)
            self.pool = torch.cuda.graph_pool_handle()  # one pool for every (re)capture: no pool per epoch

    def _lr_key(self) -> tuple:
        return tuple(tuple(g["lr"] for g in o.param_groups) for o in self.searcher._optimisers().values())

    def _warm_up(self, batches: tuple[Batch, Batch]) -> None:
        cuda = self.device.type == "cuda"
        cpu_rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state(self.device) if cuda else None
        shadow = copy.deepcopy(self.searcher)
        side = torch.cuda.Stream(self.device) if cuda else None
        if side is not None:
            side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "This instance was constructed with capturable=True")  # eager, by design
            for _ in range(self.warmup):
                shadow.step(*batches)
        if side is not None:
            torch.cuda.current_stream(self.device).wait_stream(side)
            torch.cuda.synchronize(self.device)
        _init_states_like(self.searcher, shadow)
        del shadow
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, self.device)
        self._warmed = True

    def _capture(self, batches: tuple[Batch, Batch]) -> None:
        # The previous graph lives until the new one is captured: destroying it first drops the
        # shared pool's use count to 0 while its cached blocks keep it listed, and capturing into
        # such a pool fails PyTorch's `use_count > 0` allocator assert (seen on an H200 at the
        # first lr change, torch 2.11; docs/NOTES.md, sixteenth session).
        previous, self._replay, self.outputs = self.graph, None, {}
        for opt in self.searcher._optimisers().values():
            opt.zero_grad(set_to_none=True)  # drop gradients that live in the previous graph's pool
        self.inputs = [t.clone() for batch in batches for t in batch]
        xt, yt, xv, yv = self.inputs
        run = lambda: self.searcher.step((xt, yt), (xv, yv))
        if self.capture:
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):  # the previous graph is never replayed again
                self.outputs = run()
            self.graph, self._replay = graph, graph.replay
        else:
            self._replay = lambda: self.outputs.update(run())
        del previous
        self.key = self._lr_key()
        self.captures += 1

    def __call__(self, train_batch: Batch, val_batch: Batch) -> dict[str, torch.Tensor]:
        batches = (train_batch, val_batch)
        if not self._warmed:
            self._warm_up(batches)
        if self._replay is None or self._lr_key() != self.key:
            self._capture(batches)
        for dst, src in zip(self.inputs, (t for batch in batches for t in batch), strict=True):
            if dst.shape != src.shape:
                raise ValueError(f"cuda_graph: batch shape {tuple(src.shape)} != captured {tuple(dst.shape)}")
            dst.copy_(src, non_blocking=True)
        self._replay()
        return {k: v.clone() for k, v in self.outputs.items()}
