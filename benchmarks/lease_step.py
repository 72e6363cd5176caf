"""LeaSE step cost against a DARTS step at the same size, measured in one run.

Times `LeaseSearcher.step` (search/lease.py: stage-4 hypergradient through E', the attack
and W', then stages 1-3) and `DartsSearcher.step` on the same supernet size and the same
synthetic batches, and reports median step time and peak memory (CUDA: max allocated;
CPU: peak RSS growth of this process, coarse; plus process CPU time per step, which a
shared machine's load does not inflate) with their ratio, as one JSON object.

    python benchmarks/lease_step.py --device cpu -B 8 -C 4 --layers 3 --image-size 16
    python benchmarks/lease_step.py --device cuda -B 64 -C 16 --layers 8 --image-size 32 --order second
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from distsearch.search import DartsSearcher, LeaseSearcher
from search_spaces import Supernet


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-B", "--batch-size", type=int, default=8)
    p.add_argument("-C", "--channels", type=int, default=4, help="supernet initial channels")
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--in-channels", type=int, default=3)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--order", choices=("first", "second"), default="second")
    p.add_argument("--exact-attack", action="store_true", help="first_order=False: all attack steps unrolled")
    p.add_argument("--attack-steps", type=int, default=7)
    p.add_argument("--audience", default="small_cnn", help="robust/models.py name (resnet18, small_cnn, ...)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per algorithm (after 1 warm-up)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None)
    return p.parse_args(argv)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(make: Callable[[], Any], batches: list, device: torch.device, steps: int) -> dict[str, float]:
    torch.manual_seed(0)
    searcher = make()
    rss0 = _peak_rss_mib()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    searcher.step(*batches[0])  # warm-up (allocator, cuDNN autotuning)
    times, cpu_times = [], []
    for i in range(steps):
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        metrics = searcher.step(*batches[(i + 1) % len(batches)])
        _sync(device)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    out = {"step_ms_median": 1e3 * statistics.median(times), "step_ms_min": 1e3 * min(times)}
    if device.type == "cpu":  # process CPU time: robust to other load on a shared machine
        out["step_cpu_ms_median"] = 1e3 * statistics.median(cpu_times)
    if device.type == "cuda":
        out["peak_mem_mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        out["peak_rss_growth_mib"] = _peak_rss_mib() - rss0
    out["finite_metrics"] = all(bool(torch.isfinite(v)) for v in metrics.values())
    del searcher
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    g = torch.Generator().manual_seed(0)
    batches = [
        tuple(
            (
                torch.rand(a.batch_size, a.in_channels, a.image_size, a.image_size, generator=g).to(device),
                torch.randint(0, a.classes, (a.batch_size,), generator=g).to(device),
            )
            for _ in range(2)
        )
        for _ in range(3)
    ]
    supernet = lambda: Supernet(
        in_channels=a.in_channels, num_classes=a.classes, C=a.channels, layers=a.layers, nodes=a.nodes
    ).to(device)
    common = dict(epochs=50, order=a.order)
    darts = measure(lambda: DartsSearcher(supernet(), **common), batches, device, a.steps)
    lease = measure(
        lambda: LeaseSearcher(
            supernet(),
            in_channels=a.in_channels,
            num_classes=a.classes,
            audience=a.audience,
            attack_steps=a.attack_steps,
            first_order=not a.exact_attack,
            **common,
        ),
        batches,
        device,
        a.steps,
    )
    result = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)",
        "config": vars(a),
        "darts": darts,
        "lease": lease,
        "time_ratio_lease_over_darts": lease["step_ms_median"] / darts["step_ms_median"],
    }
    if device.type == "cuda":
        result["mem_ratio_lease_over_darts"] = lease["peak_mem_mib"] / max(darts["peak_mem_mib"], 1e-9)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
