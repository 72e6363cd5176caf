"""Ray Tune overhead: the same K small searches run one after another in this process, then
as Tune trials (FIFO, random search, `--concurrency` at a time, 1 CPU each) on a local Ray.

Prints both wall times, their ratio (goal on 2 cores: <= 0.6), Ray's start time, the fixed
cost (Tune wall - sequential wall / concurrency: what running under Tune adds to perfect
parallelism) and that per trial in core-seconds. Several search lengths (--epochs 2 30)
give one row each; the fixed cost is per experiment (Ray's start, each trial worker's first
torch / torch._dynamo / matplotlib imports), so the ratio falls as searches grow: the
defaults (8 searches of 2 and of 30 epochs, ~8 min on 2 cores) show both sides of it.

    python benchmarks/tune_overhead.py --k 8 --epochs 2 30
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def small_raw(uri: str, epochs: int, n: int) -> dict:
    return {
        "name": "bench",
        "seed": 0,
        "epochs": epochs,
        "device": "cpu",
        "threads": 1,
        "data": {
            "name": "synthetic",
            "batch_size": 32,
            "eval_batch_size": 128,
            "synthetic": {"n": n, "channels": 1, "image_size": 8, "num_classes": 4},
        },
        "space": {"C": 4, "layers": 2, "nodes": 2},
        "algorithm": {"name": "darts", "order": "first"},
        "storage": {"uri": uri},
        "monitor": {"progress": False, "tensorboard": True, "log_every": 10},
    }


def sequential(k: int, epochs: int, n: int, threads: int, tmp: str) -> list[float]:
    import torch

    from distsearch.config_file import parse_config
    from distsearch.runner import run_search
    from distsearch.storage import Store

    torch.set_num_threads(threads)
    walls = []
    for i in range(k):
        uri = os.path.join(tmp, "seq", str(i))
        raw = small_raw(uri, epochs, n) | {"seed": i, "threads": threads}
        t0 = time.perf_counter()
        run_search(parse_config(raw), Store(uri))
        walls.append(time.perf_counter() - t0)
    return walls


def with_tune(k: int, epochs: int, n: int, concurrency: int, tmp: str) -> tuple[float, float]:
    import ray

    from distsearch.config_file import parse_config
    from distsearch.distributed import tuner as T

    raw = small_raw("unused", epochs, n)
    raw["tune"] = {
        "search_alg": "random",
        "scheduler": "fifo",
        "num_samples": 1,
        "max_concurrent_trials": concurrency,
        "resources": {"cpu": 1},
        "params": {"seed": {"grid": list(range(k))}},
    }
    spec = T.experiment_spec(parse_config(raw), storage=os.path.join(tmp, "tune"), name="bench")
    T.save_spec(spec)
    t0 = time.perf_counter()
    ray.init(num_cpus=concurrency, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    t_init = time.perf_counter() - t0
    try:
        results = T.build_tuner(spec, verbose=0).fit()
        wall = time.perf_counter() - t0
        assert not results.errors, results.errors
    finally:
        ray.shutdown()
    return wall, t_init


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    ap.add_argument("--k", type=int, default=8, help="number of searches")
    ap.add_argument("--epochs", type=int, nargs="+", default=[2, 30], help="search lengths, one row each")
    ap.add_argument("--n", type=int, default=384, help="synthetic examples per search")
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--seq-threads", type=int, default=1, help="torch threads of the sequential run")
    args = ap.parse_args()
    print(f"K={args.k} searches, {args.concurrency} Tune trials at a time, {os.cpu_count()} cores")
    print("| epochs | one search | sequential | Tune (ray.init) | ratio | without ray.init | fixed cost | per-trial |")
    print("|---|---|---|---|---|---|---|---|")
    for epochs in args.epochs:
        with tempfile.TemporaryDirectory(prefix="tune-overhead-") as tmp:
            seq = sequential(args.k, epochs, args.n, args.seq_threads, tmp)
            tune_wall, t_init = with_tune(args.k, epochs, args.n, args.concurrency, tmp)
        seq_wall = sum(seq)
        fixed = tune_wall - seq_wall / args.concurrency
        print(
            f"| {epochs} | {seq_wall / args.k:.1f} s | {seq_wall:.1f} s | {tune_wall:.1f} s ({t_init:.1f} s) "
            f"| {tune_wall / seq_wall:.2f} | {(tune_wall - t_init) / seq_wall:.2f} | {fixed:.1f} s "
            f"| {fixed * args.concurrency / args.k:+.1f} core-s |",
            flush=True,
        )
        goal = 0.6 - 1 / args.concurrency
        if goal > 0:
            print(f"  ratio <= 0.6 from about {fixed / goal:.0f} s of sequential work (fixed / (0.6 - 1/concurrency))")
    print("ratio = Tune wall / sequential wall (goal <= 0.60); fixed cost = Tune wall - sequential / concurrency")


if __name__ == "__main__":
    main()
