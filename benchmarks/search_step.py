"""Search-step throughput and memory (issue: foundation, LeaSE and DSRNA benchmarks).

Times `Searcher.step` on a DARTS supernet (defaults: B=64, C=16, 8 cells, 3x32x32, 10
classes, the DARTS paper's CIFAR size) for each algorithm asked, always beside a DARTS
first-order baseline measured in the same process, and prints JSON: ms/step, images/s,
peak memory (CUDA), the aten calls that launch work in one step (`kernels_per_step`: the
launch-bound GPU step's cost, counted the same on any device) and each algorithm's ratio to
the baseline. Fast-path switches: --channels-last and --bf16 (autocast).

    python benchmarks/search_step.py --algorithm darts darts2 lease dsrna-jacobian dsrna-jacobian-fd dsrna-certified
    python benchmarks/search_step.py --algorithm dsrna-jacobian-fd dsrna-jacobian-fd-quarter  # R on B/4 examples
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from distsearch.search import SEARCHERS
from distsearch.search.graphed import GraphedStep
from search_spaces import Supernet, double_backward

OPT = dict(
    w_lr=0.025,
    w_lr_min=0.001,
    w_momentum=0.9,
    w_weight_decay=3e-4,
    grad_clip=5.0,
    arch_lr=3e-4,
    arch_betas=(0.5, 0.999),
    arch_weight_decay=1e-3,
)
ALGORITHMS = {
    "darts": ("darts", dict(order="first")),
    "darts2": ("darts", dict(order="second")),
    "lease": ("lease", dict(order="first")),
    "dsrna-jacobian": ("dsrna", dict(variant="jacobian")),
    "dsrna-jacobian-fd": ("dsrna", dict(variant="jacobian", jacobian_fd_step=1.0)),
    # the same step with L_val's forward apart from the finite differences' (search/dsrna.py)
    "dsrna-jacobian-fd-separate": ("dsrna", dict(variant="jacobian", jacobian_fd_step=1.0)),
    "dsrna-certified": ("dsrna", dict(variant="certified")),
    # R on the first quarter of each validation batch (algorithm.robust_batch = B / 4)
    "dsrna-jacobian-fd-quarter": ("dsrna", dict(variant="jacobian", jacobian_fd_step=1.0)),
    "dsrna-certified-quarter": ("dsrna", dict(variant="certified")),
}


def supernet(args: argparse.Namespace, device: torch.device) -> Supernet:
    return Supernet(args.channels, args.classes, C=args.C, layers=args.layers, nodes=args.nodes).to(device)


def make(algo: str, args: argparse.Namespace, device: torch.device):
    name, kw = ALGORITHMS[algo]
    if name not in SEARCHERS:
        raise SystemExit(f"--algorithm {algo}: '{name}' is not registered in distsearch.search.SEARCHERS")
    model = supernet(args, device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    extra = dict(in_channels=args.channels, num_classes=args.classes) if name == "lease" else {}
    if name == "dsrna":
        extra = dict(projections=args.projections, bound=args.bound)
        if algo.endswith("-quarter"):
            extra["robust_batch"] = max(1, args.batch // 4)
    searcher = SEARCHERS[name](model, epochs=50, **OPT, **kw, **extra)
    if algo.endswith("-separate"):
        searcher.fused = False
    return searcher


class _KernelCount(TorchDispatchMode):
    """Counts the aten calls that launch work: views, metadata and allocations left out."""

    FREE = ("empty", "empty_strided", "_record_function_enter_new", "_record_function_exit", "detach")

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if not func.is_view and func.overloadpacket.__name__ not in self.FREE:
            self.count += 1
        return func(*args, **(kwargs or {}))


def bench(algo: str, args: argparse.Namespace, device: torch.device, graph: bool = False) -> dict:
    torch.manual_seed(0)
    searcher = make(algo, args, device)
    step = GraphedStep(searcher, warmup=args.warmup) if graph else searcher.step
    shape = (args.batch, args.channels, args.size, args.size)
    batches = [
        (torch.rand(shape, device=device), torch.randint(args.classes, (args.batch,), device=device)) for _ in range(2)
    ]
    if args.channels_last:
        batches = [(x.contiguous(memory_format=torch.channels_last), y) for x, y in batches]
    amp = contextlib.nullcontext()
    if args.bf16:  # autocast's weight cache would hold tensors of a finished capture
        amp = torch.autocast(device.type, torch.bfloat16, cache_enabled=not graph)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":  # from the first warm-up on: a graph's pool is allocated at its capture
        torch.cuda.reset_peak_memory_stats(device)
    with amp:
        for _ in range(args.warmup):
            step(*batches)
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(args.steps):
            metrics = step(*batches)
        sync()
    ms = (time.perf_counter() - t0) / args.steps * 1000
    cpu_ms = (time.process_time() - c0) / args.steps * 1000  # not inflated by other processes' load
    kernels = None
    if not graph:  # a replayed graph dispatches nothing
        with amp, _KernelCount() as counter:
            step(*batches)
        kernels = counter.count
    if args.profile and device.type == "cuda":
        with amp, torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            step(*batches)
            sync()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15), file=sys.stderr)
    out = {
        "algorithm": algo + ("+cuda_graph" if graph else ""),
        "ms_per_step": round(ms, 2),
        "cpu_ms_per_step": round(cpu_ms, 2),
        "images_per_s": round(args.batch / ms * 1000, 1),
        "kernels_per_step": kernels,
        "metrics": {k: round(float(v), 4) for k, v in metrics.items()},
    }
    if device.type == "cuda":
        out["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    del searcher
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def saved_for_backward_gib(args: argparse.Namespace, device: torch.device) -> float:
    """GiB that one training-mode supernet forward (alpha and w requiring grad) keeps for its
    backward: the activation memory of a search step's pass, measured the same on any device."""
    torch.manual_seed(0)
    model = supernet(args, device)
    x = torch.rand(args.batch, args.channels, args.size, args.size, device=device)
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum()
    return round(sum(storages.values()) / 2**30, 3)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--algorithm", nargs="+", default=["darts", "darts2"], choices=list(ALGORITHMS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--C", type=int, default=16)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--projections", type=int, default=1, help="DSRNA Jacobian: 0 exact, else random projections")
    p.add_argument("--bound", default="ibp", choices=["ibp", "crown"], help="DSRNA certified bound")
    p.add_argument("--cuda-graph", action="store_true", help="also time each step replayed from a CUDA graph")
    p.add_argument("--profile", action="store_true", help="print the top CUDA kernels of one step (stderr)")
    p.add_argument("--cudnn-benchmark", action="store_true", help="let cuDNN autotune each conv shape")
    p.add_argument(
        "--torch-depthwise-double-backward",
        action="store_true",
        help="depthwise convs keep torch's double backward (search_spaces/double_backward.py)",
    )
    args = p.parse_args()
    double_backward.OWN_DEPTHWISE_BACKWARD = not args.torch_depthwise_double_backward
    device = torch.device(args.device)
    if device.type == "cuda":  # autotuning hundreds of conv shapes can take minutes on first use
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
    results = [bench("darts", args, device)]
    base = results[0]["ms_per_step"]
    for algo in args.algorithm:
        if algo != "darts":
            results.append(bench(algo, args, device))
    if args.cuda_graph:  # each algorithm again, its step replayed from one CUDA graph
        for algo in dict.fromkeys(["darts", *args.algorithm]):
            try:
                results.append(bench(algo, args, device, graph=True))
            except Exception as e:  # keep the eager figures when a capture fails
                print(f"{algo}+cuda_graph failed: {type(e).__name__}: {e}", file=sys.stderr)
                results.append({"algorithm": f"{algo}+cuda_graph", "error": f"{type(e).__name__}: {e}"[:500]})
                torch.cuda.empty_cache()
    for r in results:
        if "ms_per_step" in r:
            r["ratio_to_darts_first_order"] = round(r["ms_per_step"] / base, 3)
    info = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "config": vars(args),
        "supernet_forward_saved_gib": saved_for_backward_gib(args, device),
        "results": results,
    }
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
