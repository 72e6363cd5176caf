"""DSRNA step cost (Hosseini, Yang, Xie, CVPR 2021) against a DARTS step of the same size,
measured in one run.

Times `DsrnaSearcher.step` for the Jacobian variant (exact: K backward passes with
create_graph; and with random projections) and the certified variant (IBP and CROWN-IBP
bounds), beside `DartsSearcher.step` on the same supernet size and batches, and prints one
JSON object: median ms/step, peak memory (CUDA: max allocated; CPU: peak RSS growth,
coarse, and process CPU time per step, which a shared machine's load does not inflate) and
each variant's ratio to DARTS.

    python benchmarks/dsrna_step.py --device cpu -B 8 -C 4 --layers 3 --image-size 16 --threads 1
    python benchmarks/dsrna_step.py --device cuda -B 64 -C 16 --layers 8 --image-size 32
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from typing import Any

import torch

from distsearch.search import DartsSearcher, DsrnaSearcher
from search_spaces import Supernet

VARIANTS: dict[str, dict[str, Any]] = {
    "jacobian": dict(variant="jacobian", projections=0),
    "jacobian_proj1": dict(variant="jacobian", projections=1),
    "certified_ibp": dict(variant="certified", bound="ibp"),
    "certified_crown": dict(variant="certified", bound="crown"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-B", "--batch-size", type=int, default=8)
    p.add_argument("-C", "--channels", type=int, default=4)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--in-channels", type=int, default=3)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--order", choices=("first", "second"), default="first")
    p.add_argument("--eps", type=float, default=8 / 255)
    p.add_argument("--norm", choices=("linf", "l2"), default="linf")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--steps", type=int, default=5, help="timed steps per algorithm (after 1 warm-up)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None)
    return p.parse_args(argv)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(make, batches: list, device: torch.device, steps: int) -> dict[str, Any]:
    torch.manual_seed(0)
    searcher = make()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    searcher.step(*batches[0])  # warm-up
    times, cpu = [], []
    for i in range(steps):
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        metrics = searcher.step(*batches[(i + 1) % len(batches)])
        _sync(device)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    out: dict[str, Any] = {"step_ms_median": 1e3 * statistics.median(times)}
    if device.type == "cuda":
        out["peak_mem_mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        out["step_cpu_ms_median"] = 1e3 * statistics.median(cpu)
        out["peak_rss_growth_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss0
    out["finite_metrics"] = all(bool(torch.isfinite(v)) for v in metrics.values())
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    g = torch.Generator().manual_seed(0)
    shape = (a.batch_size, a.in_channels, a.image_size, a.image_size)
    batch = lambda: (
        torch.rand(shape, generator=g).to(device),
        torch.randint(0, a.classes, shape[:1], generator=g).to(device),
    )
    batches = [(batch(), batch()) for _ in range(3)]
    net = lambda: Supernet(a.in_channels, a.classes, C=a.channels, layers=a.layers, nodes=a.nodes).to(device)
    common = dict(epochs=50, order=a.order)
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)",
        "config": vars(a),
        "darts": measure(lambda: DartsSearcher(net(), **common), batches, device, a.steps),
    }
    key = "step_cpu_ms_median" if device.type == "cpu" else "step_ms_median"
    for name in a.variants:
        kw = dict(common, eps=a.eps, norm=a.norm, **VARIANTS[name])
        try:
            r = measure(lambda kw=kw: DsrnaSearcher(net(), **kw), batches, device, a.steps)
        except RuntimeError as e:  # e.g. CUDA out of memory: report it, keep the other rows
            result[f"dsrna_{name}"] = {"error": str(e).splitlines()[0][:200]}
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        r["time_ratio_over_darts"] = r[key] / result["darts"][key]
        if device.type == "cuda":
            r["mem_ratio_over_darts"] = r["peak_mem_mib"] / max(result["darts"]["peak_mem_mib"], 1e-9)
        result[f"dsrna_{name}"] = r
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
