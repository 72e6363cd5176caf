"""Adversarial-training cost versus robustness on mnist5k, every strategy at the same budget.

Each strategy trains the same model from the same seed for the same number of epochs (FreeAT
for epochs/m, its own rule, so its passes match standard training's), then we measure, in one
run on one machine: wall time, counted forward/backward passes, clean accuracy, PGD-20
accuracy at ε (L∞) and ε₂ (L2), and each cost's ratio to PGD-7 training (Madry et al. 2018).

    python benchmarks/adv_training.py                  # about 3-5 minutes on 2 CPU cores
    python benchmarks/adv_training.py --n-train 4000 --epochs 5 --model small_cnn --csv out.csv
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from distsearch.data import load_dataset
from distsearch.robust.attacks import PGD
from distsearch.robust.evaluate import accuracy
from distsearch.robust.models import build_model
from distsearch.robust.tables import to_markdown, write_csv
from distsearch.robust.training import STRATEGIES, fit, make_strategy

L2_METHODS = ("fgm", "freelb")


def strategy_kwargs(name: str, eps: float, eps_l2: float, replays: int) -> dict:
    if name == "standard":
        return {}
    if name in L2_METHODS:
        return {"eps": eps_l2}
    if name == "pgd":
        return {"eps": eps, "steps": 7}
    if name == "free":
        return {"eps": eps, "replays": replays}
    return {"eps": eps}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--n-train", type=int, default=2000, help="training images from mnist5k")
    p.add_argument("--n-test", type=int, default=500, help="held-out images for clean and PGD-20 accuracy")
    p.add_argument("--epochs", type=int, default=4, help="epochs per strategy (FreeAT: epochs // replays)")
    p.add_argument("--replays", type=int, default=4, help="FreeAT's m")
    p.add_argument("--model", default="small_cnn", help="a name from distsearch.robust.models.MODELS")
    p.add_argument("--width", type=int, default=8, help="small_cnn width")
    p.add_argument("--eps", type=float, default=0.1, help="L∞ budget for training and evaluation")
    p.add_argument("--eps-l2", type=float, default=1.5, help="L2 budget (FGM, FreeLB and the L2 column)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated subset")
    p.add_argument("--csv", default=None, help="also write the table here")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    names = [s.strip() for s in a.strategies.split(",") if s.strip()]
    bad = [s for s in names if s not in STRATEGIES]
    if bad or a.epochs < 1 or a.n_train < a.batch_size:
        print(f"error: --strategies {bad} unknown, or --epochs < 1, or --n-train < --batch-size", file=sys.stderr)
        return 2
    torch.set_num_threads(a.threads)
    d = load_dataset("mnist5k", seed=a.seed)
    x, y = d.x_train[: a.n_train], d.y_train[: a.n_train]
    xt, yt = d.x_test[: a.n_test], d.y_test[: a.n_test]
    extra = {"width": a.width} if a.model == "small_cnn" else {}
    rows = []
    for name in names:
        torch.manual_seed(a.seed)
        model = build_model(a.model, d.in_channels, d.num_classes, **extra)
        opt = torch.optim.Adam(model.parameters(), lr=a.lr)
        strategy = make_strategy(name, **strategy_kwargs(name, a.eps, a.eps_l2, a.replays))
        epochs = max(1, a.epochs // a.replays) if name == "free" else a.epochs
        t0 = time.perf_counter()
        totals = fit(model, strategy, x, y, epochs, opt, a.batch_size, seed=a.seed)
        wall = time.perf_counter() - t0
        torch.manual_seed(a.seed)
        rows.append(
            {
                "strategy": name,
                "epochs": epochs,
                "wall_s": wall,
                "forward": int(totals["forward_passes"]),
                "backward": int(totals["backward_passes"]),
                "first_layer": int(totals["first_layer_passes"]),
                "clean_acc": accuracy(model, xt, yt),
                "pgd20_linf": accuracy(model, xt, yt, PGD(a.eps, steps=20, norm="linf")),
                "pgd20_l2": accuracy(model, xt, yt, PGD(a.eps_l2, steps=20, norm="l2")),
            }
        )
        print(f"  {name}: {wall:.1f} s", file=sys.stderr, flush=True)
    ref = next((r for r in rows if r["strategy"] == "pgd"), None)
    for r in rows if ref else []:
        for key in ("wall_s", "forward", "backward"):
            r[f"{key}/pgd7"] = r[key] / ref[key]
    if ref is None:
        print("note: no pgd in --strategies, so no ratios against PGD-7", file=sys.stderr)
    print(
        f"mnist5k: {a.n_train} train / {a.n_test} test, {a.model}, {a.epochs} epochs, batch {a.batch_size}, "
        f"eps_linf={a.eps}, eps_l2={a.eps_l2}, {a.threads} thread(s), accuracies in %"
    )
    print(to_markdown(rows, digits=2))
    if a.csv:
        write_csv(rows, a.csv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
