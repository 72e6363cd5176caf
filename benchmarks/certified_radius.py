"""Mean certified radius of a DSRNA-certified genotype versus a DARTS one, at equal budget (issue 5).

Two searches on mnist5k with the same seed, supernet, data and epochs: DARTS (first order)
and DSRNA `variant: certified` (Hosseini, Yang, Xie, CVPR 2021, eq. 1: the arch step
minimises L_val - gamma * R_cb, R_cb from IBP/CROWN bounds at eps). Each derived genotype is
retrained the same way (standard training, same seed and epochs), then measured on the same
first `--n-eval` test images: clean accuracy, PGD-20 accuracy (L-inf), certified accuracy at
`--cert-eps`, and the mean certified L-inf radius by IBP and by CROWN (bisection of log eps in
[0, --eps-max]; 0 for a misclassified image). Accuracies are in percent. Prints one Markdown
table, the DSRNA/DARTS ratio of the mean certified radius and both genotypes.

    python benchmarks/certified_radius.py                  # about 10 minutes on 1 CPU core
    python benchmarks/certified_radius.py --epochs 5 --subset 3000 --out runs/cr --gamma 0.1 --seed 1
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from distsearch.config import SearchConfig, TrainConfig
from distsearch.config_file import parse_config
from distsearch.robust.attacks import PGD
from distsearch.robust.certify import certify_table, mean_certified_radius
from distsearch.robust.evaluate import accuracy
from distsearch.robust.tables import to_markdown
from distsearch.runner import run_search
from distsearch.storage import Store
from distsearch.train import load_model, run_training

METHODS = ("ibp", "crown")


def common(a: argparse.Namespace, uri: str) -> dict[str, Any]:
    return {
        "seed": a.seed,
        "epochs": a.epochs,
        "device": "cpu",
        "threads": a.threads,
        "data": {"name": "mnist5k", "subset": a.subset, "batch_size": a.batch_size},
        "storage": {"uri": uri, "keep": 1},
        "monitor": {"tensorboard": False, "progress": a.progress},
    }


def search_config(a: argparse.Namespace, algorithm: dict[str, Any], uri: str) -> SearchConfig:
    raw = common(a, uri) | {
        "name": f"cr_search_{algorithm['name']}",
        "space": {"C": a.C, "layers": a.layers, "nodes": a.nodes},
        "optim": {"w_lr": a.w_lr, "arch_lr": a.arch_lr},
        "algorithm": algorithm,
    }
    return parse_config(raw, SearchConfig)


def train_config(a: argparse.Namespace, genotype_uri: str, uri: str) -> TrainConfig:
    raw = common(a, uri) | {
        "name": "cr_train",
        "model": {"genotype": genotype_uri, "C": a.C, "layers": a.layers},
        "strategy": {"strategy": "standard"},
        "optim": {"lr": a.w_lr},
        "eval": {"n": 0},  # PGD is measured below, once, on the shared images
    }
    return parse_config(raw, TrainConfig)


def measure(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, a: argparse.Namespace) -> dict[str, Any]:
    """Clean / PGD-20 / certified accuracy (%, certified at cert-eps) and mean certified radius per method."""
    torch.manual_seed(a.seed)  # PGD's random start
    row: dict[str, Any] = {
        "clean_acc": accuracy(model, x, y),
        f"pgd20_acc@{a.pgd_eps:g}": accuracy(model, x, y, PGD(eps=a.pgd_eps, steps=20, norm="linf")),
    }
    radii = {}
    for method in METHODS:
        (t,) = certify_table(model, x, y, [a.cert_eps], "linf", method, radius=False)
        mean, r = mean_certified_radius(model, x, y, "linf", method, eps_max=a.eps_max, steps=a.bisect_steps)
        row[f"cert_acc_{method}@{a.cert_eps:g}"] = t["certified_acc"]
        row[f"mcr_{method}"] = mean
        radii[method] = r
    row["_radii"] = radii
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--out", default=None, help="folder for the four stores (default: a temporary one, removed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=3, help="epochs of each search and each retraining")
    p.add_argument("--subset", type=int, default=1500, help="mnist5k training images (half D_tr, half D_val)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--C", type=int, default=4, help="initial channels of supernet and network")
    p.add_argument("--layers", type=int, default=3, help="cells of supernet and network")
    p.add_argument("--nodes", type=int, default=3, help="intermediate nodes per cell")
    p.add_argument("--w-lr", type=float, default=0.05)
    p.add_argument("--arch-lr", type=float, default=3e-3)
    p.add_argument("--eps", type=float, default=0.05, help="DSRNA's eps (L-inf) in R_cb")
    p.add_argument("--gamma", type=float, default=0.01, help="DSRNA's gamma")
    p.add_argument("--bound", choices=METHODS, default="ibp", help="DSRNA's bound in R_cb")
    p.add_argument("--n-eval", type=int, default=150, help="test images for every measurement (same for both)")
    p.add_argument("--pgd-eps", type=float, default=0.05, help="L-inf eps of the PGD-20 accuracy")
    p.add_argument("--cert-eps", type=float, default=0.01, help="L-inf eps of the certified accuracy")
    p.add_argument("--eps-max", type=float, default=0.05, help="upper end of the radius bisection")
    p.add_argument(
        "--bisect-steps",
        type=int,
        default=16,
        help="bisection steps on log eps (relative precision 2**(20 / 2**steps))",
    )
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--progress", action="store_true", help="show tqdm bars")
    p.add_argument("--json", default=None, help="also write rows, ratios and genotypes here")
    a = p.parse_args(argv)
    if a.epochs < 1 or a.n_eval < 1 or a.subset < 4 * a.batch_size:
        print("error: need --epochs >= 1, --n-eval >= 1 and --subset >= 4 * --batch-size", file=sys.stderr)
        return 2
    torch.set_num_threads(a.threads)
    tmp = None if a.out else tempfile.TemporaryDirectory(prefix="certified_radius_")
    out = Path(a.out or tmp.name)
    algorithms = {
        "darts": {"name": "darts", "order": "first"},
        "dsrna-certified": {
            "name": "dsrna",
            "order": "first",
            "variant": "certified",
            "bound": a.bound,
            "bn_stats": "running",
            "eps": a.eps,
            "gamma": a.gamma,
            "norm": "linf",
        },
    }
    rows, genotypes, radii, x = [], {}, {}, None
    t_all, c_all = time.perf_counter(), time.process_time()
    try:
        for label, algo in algorithms.items():
            t0, c0 = time.perf_counter(), time.process_time()
            s_uri, t_uri = str(out / f"search_{label}"), str(out / f"train_{label}")
            result = run_search(search_config(a, algo, s_uri), Store(s_uri))
            t_search = time.perf_counter() - t0
            final = run_training(train_config(a, s_uri, t_uri), Store(t_uri))
            model, data, _ = load_model(t_uri)
            x, y = data.x_test[: a.n_eval], data.y_test[: a.n_eval]
            row = {"label": label, "n": int(x.shape[0])}
            row.update(measure(model, x, y, a))
            radii[label] = row.pop("_radii")
            row["search_val_acc"] = 100.0 * result.metrics.get("val/acc", math.nan)
            row["train_test_acc"] = 100.0 * final.get("test/acc", math.nan)
            row["search_s"] = t_search
            row["total_s"] = time.perf_counter() - t0
            row["cpu_s"] = time.process_time() - c0
            rows.append(row)
            genotypes[label] = result.genotype
    finally:
        if tmp is not None:
            tmp.cleanup()
    ratios = {m: rows[1][f"mcr_{m}"] / rows[0][f"mcr_{m}"] if rows[0][f"mcr_{m}"] > 0 else math.nan for m in METHODS}
    space = f"C={a.C}, {a.layers} cells, {a.nodes} nodes"
    print(f"\nmnist5k, subset {a.subset}, {a.epochs} epochs, {space}, seed {a.seed}")
    print(f"DSRNA certified: {a.bound}, eps {a.eps:g}, gamma {a.gamma:g}, bn_stats running; retrain: standard.")
    print(f"Measured on the first {a.n_eval} test images; radius = L-inf, bisection of log eps below {a.eps_max:g}.\n")
    shown = [
        {k: f"{v:.3e}" if k.startswith("mcr_") else round(v, 1) if k.endswith("_s") else v for k, v in r.items()}
        for r in rows
    ]
    print(to_markdown(shown, digits=2))
    print(" | ".join(f"mean certified radius DSRNA/DARTS ({m}): {ratios[m]:.3f}" for m in METHODS))
    same = genotypes["darts"].to_dict() == genotypes["dsrna-certified"].to_dict()
    print(f"genotypes identical: {same}")
    for label, g in genotypes.items():
        print(f"{label}: {g}")
    print(f"wall {time.perf_counter() - t_all:.1f} s, CPU {time.process_time() - c_all:.1f} s")
    if a.json:
        Path(a.json).write_text(
            json.dumps(
                {
                    "args": vars(a),
                    "rows": rows,
                    "ratios": ratios,
                    "genotypes": {k: g.to_dict() for k, g in genotypes.items()},
                    "radii": {k: {m: r.tolist() for m, r in v.items()} for k, v in radii.items()},
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
