"""`distsearch train | transfer`: the commands that train networks. `train` fits a genotype's
network or a named model with an adversarial-training strategy (train.run_training) into its
own store; `transfer` trains several models and measures how their adversarial examples
transfer (Szegedy et al. 2014, tables 2-4). Evaluating a trained run: cli_robust.py.
"""

from __future__ import annotations

import argparse
import math
import os
import posixpath
import re
import sys
import tempfile
from typing import Any

from .cli import add_resume_args, add_threads_arg
from .cli_robust import _positive_float
from .data import located
from .errors import UsageError, out_uri


def default_train_out(cfg: Any) -> str:
    """runs/train_<model or genotype>_<strategy>: the same command finds it again (--resume), and it
    is never a search's store (a search's default is its config's storage.uri)."""
    if cfg.model.name:
        source = cfg.model.name
    else:
        ref = cfg.model.genotype.rstrip("/")
        source = posixpath.basename(ref)
        if source.endswith(".json"):
            source = source[: -len(".json")]
            if source == "genotype":  # <search --out>/genotype.json: name it after the search
                source = posixpath.basename(posixpath.dirname(ref)) or source
    source = re.sub(r"[^A-Za-z0-9_.-]+", "_", source).strip("._") or "genotype"
    return f"runs/train_{source}_{cfg.strategy.strategy}"


def _search_data(raw: dict[str, Any]) -> tuple[dict[str, Any], list[str] | None, str]:
    """`raw` completed with the data set and seed of the search (or training run) its model.genotype
    comes from, so a genotype is retrained on what it was searched on (and tested on the search's
    test split), not on the default mnist5k. The file's or --set's own data keys and seed win; a
    data.name of another data set takes nothing. Returns the completed raw, the data keys given that
    differ from the run's (None: nothing taken) and the run's kind ('search' or 'training')."""
    from .config import local_path
    from .train import search_data

    genotype = (raw.get("model") or {}).get("genotype")
    found = search_data(genotype) if isinstance(genotype, str) else None
    own = raw.get("data") or {}
    if found is None or own.get("name", found["data"]["name"]) != found["data"]["name"]:
        return raw, None, ""

    def same(key: str, a: Any, b: Any) -> bool:
        return local_path(a) == local_path(b) if key in ("root", "path") and a and b else a == b

    changed = [f"data.{k}" for k, v in own.items() if k in found["data"] and not same(k, v, found["data"][k])]
    changed += ["seed"] if raw.get("seed", found["seed"]) != found["seed"] else []
    kind = "training" if found["kind"] == "train" else "search"
    return {"seed": found["seed"], **raw, "data": {**found["data"], **own}}, changed, kind


def _note_search_data(cfg: Any, changed: list[str], kind: str) -> None:
    what = f"{located(cfg.data.name, cfg.data.root, cfg.data.path)}, seed {cfg.seed}"
    how = f"the {kind}'s, with your {', '.join(changed)}" if changed else f"as the {kind} ran on"
    print(f"note: data: {what} ({how}; --set data.name=... trains on another)", file=sys.stderr)


def cmd_train(args: argparse.Namespace) -> int:
    from .cli import refuse_unfit_out
    from .config import TrainConfig
    from .config_file import apply_overrides, check_kind, occupied, parse_config, read_yaml, stored_config
    from .driver_lease import DriverLease
    from .storage import Store
    from .train import run_training

    sets = []
    if args.genotype:
        sets.append(f"model.genotype={args.genotype}")
    if args.model:
        sets.append(f"model.name={args.model}")
    for key, value in (
        ("strategy.strategy", args.strategy),
        ("strategy.eps", args.eps),
        ("epochs", args.epochs),
        ("threads", args.threads),
        ("storage.uri", args.out),
    ):
        if value is not None:
            sets.append(f"{key}={value}")
    sets += args.overrides
    changed, kind = None, ""
    if args.config:
        raw = read_yaml(args.config)
        check_kind(raw, TrainConfig, args.config)
        raw, changed, kind = _search_data(apply_overrides(raw, sets))
    elif args.resume and args.out and (Store(args.out).exists("config.json") or not (args.model or args.genotype)):
        raw = stored_config(args.out, "train", sets)  # continue the run as it ran, with the flags given
    elif args.model or args.genotype:
        raw, changed, kind = _search_data(apply_overrides({}, sets))
    else:
        raise UsageError("--model or --genotype: one is required (or --out URI --resume, to continue a run)")
    cfg = parse_config(raw, TrainConfig)
    if changed is not None:
        _note_search_data(cfg, changed, kind)
    if cfg.strategy.strategy == "standard" and cfg.strategy.eps is not None:  # standard has no budget to use
        if args.eps is not None:
            raise UsageError(
                f"--eps: standard training uses no attack budget; pass an adversarial --strategy with it "
                f"(e.g. --strategy pgd --eps {args.eps:g}) or leave --eps out"
            )
        raise UsageError(
            "strategy.eps: standard training uses no attack budget; set an adversarial strategy.strategy "
            "(e.g. --strategy pgd) or remove strategy.eps"
        )
    if "uri" not in cfg.storage.model_fields_set:  # not runs/search, the searches' default
        cfg.storage.uri = default_train_out(cfg)
    refuse_unfit_out(cfg.storage.uri, "--out")
    store = Store(cfg.storage.uri, field="--out" if args.out else "storage.uri")
    args.store_uri = store.uri  # for the hint after an interruption
    if store.list_checkpoints() and not args.resume:
        raise occupied(store, "train", "--out" if args.out else "storage.uri")
    store.check_writable()
    if cfg.strategy.strategy == "free" and not args.resume:
        m = cfg.strategy.build().replays
        print(
            f"note: free replays each batch {m} times, so each of the {cfg.epochs} epochs costs {m} standard ones; "
            f"Shafahi et al. train for the standard epochs / {m} (e.g. --epochs {math.ceil(cfg.epochs / m)} "
            f"for {cfg.epochs})",
            file=sys.stderr,
        )
    with DriverLease(store, "train", field="--out"):  # one process per --out
        final = run_training(cfg, store, allow_changes=args.allow_changes)
    print(" ".join(f"{k}={v:.4f}" for k, v in final.items() if k.startswith("test/")))
    print(f"written to {store.uri}; evaluate with: distsearch evaluate {store.uri}")
    return 0


def _strategy_budgets() -> str:
    """The strategies' own default budgets, e.g. '8/255 linf for fgsm, pgd, ...; 1 l2 for fgm, freelb'."""
    from .robust.training import STRATEGIES, make_strategy

    groups: dict[tuple[float, str], list[str]] = {}
    for name in STRATEGIES:
        s = make_strategy(name)
        if getattr(s, "eps", None) is not None:
            groups.setdefault((s.eps, getattr(s, "norm", None) or "linf"), []).append(name)
    return "; ".join(
        f"{'8/255' if math.isclose(eps, 8 / 255) else eps} {norm} for {', '.join(names)}"
        for (eps, norm), names in groups.items()
    )


def cmd_transfer(args: argparse.Namespace) -> int:
    import torch

    from .cli import refuse_unfit_out
    from .config_file import load_config
    from .config_transfer import TransferConfig
    from .monitor import TB_DIR, Monitor
    from .robust.attacks import make_attack
    from .robust.tables import to_markdown, write_csv, write_markdown
    from .robust.training import make_strategy
    from .robust.training_base import fit
    from .robust.transfer import plot_heatmap, transfer_table
    from .runner import build_data, setup_torch
    from .storage import Store
    from .train import named_model

    threads = [f"threads={args.threads}"] if args.threads else []
    cfg = load_config(args.config, [*args.overrides, *threads], TransferConfig)
    try:
        attack = make_attack(cfg.attack.name, **cfg.attack.kwargs)
    except ValueError as e:
        msg = str(e)
        raise UsageError(msg if msg.startswith("attack:") else f"attack: {msg}") from None
    labels = [m.label for m in cfg.models]
    if len(set(labels)) != len(labels):
        raise UsageError(f"models: labels must be distinct, got {labels}")
    if cfg.units is not None and cfg.units.model not in labels:
        raise UsageError(f"units.model: {cfg.units.model!r} is not one of the models' labels {labels}")
    default = cfg.storage.uri if "uri" in cfg.storage.model_fields_set else f"runs/transfer_{cfg.name}"
    refuse_unfit_out(args.out or default, "--out" if args.out else "storage.uri", runs_here=False)
    store = Store(args.out or default)  # never the search default runs/search
    store.check_writable()
    device = setup_torch(cfg)
    data = build_data(cfg)
    # every model built once before any training: a bad option or units section fails in seconds
    built = {m.label: named_model(m.name, data, m.kwargs, field=f"models[{m.label}]") for m in cfg.models}
    if cfg.units is not None:
        layers = [name for name, _ in built[cfg.units.model].named_modules() if name]
        if cfg.units.layer not in layers:
            raise UsageError(
                f"units.layer: {cfg.units.model} has no module {cfg.units.layer!r}; choose one of {layers}"
            )
        n_test = min(cfg.n, len(data.x_test))
        if cfg.units.k > n_test:
            raise UsageError(
                f"units.k: {cfg.units.k} is more than the {n_test} test images attacked; lower it or raise n"
            )
    models = {}
    half = len(data.x_train) // 2
    for m in cfg.models:
        x, y = data.x_train, data.y_train
        if m.half is not None:
            x, y = x[m.half * half : (m.half + 1) * half], y[m.half * half : (m.half + 1) * half]
        torch.manual_seed(m.seed)
        net = named_model(m.name, data, m.kwargs, field=f"models[{m.label}]").to(device)
        opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=0.9)
        fit(
            net,
            make_strategy("standard"),
            x.to(device),
            y.to(device),
            m.epochs or cfg.epochs,
            opt,
            batch_size=cfg.data.batch_size,
            seed=m.seed,
        )
        models[m.label] = net.eval()
        print(f"trained {m.label} ({m.name}, {'half ' + str(m.half) if m.half is not None else 'all data'})")
    x, y = data.x_test[: cfg.n].to(device), data.y_test[: cfg.n].to(device)
    rows = transfer_table(models, x, y, attack, seed=cfg.seed)
    if store.exists(TB_DIR):  # a rerun replaces the tables; its event files too (TensorBoard mixed both)
        store.fs.rm(store.path(TB_DIR), recursive=True)
        print(f"note: replacing the transfer results in {store.uri}", file=sys.stderr)
    monitor = Monitor(store, cfg.monitor.tensorboard)

    def write(folder: str) -> None:
        write_csv(rows, os.path.join(folder, "transfer.csv"))
        write_markdown(rows, os.path.join(folder, "transfer.md"))
        plot_heatmap(rows, os.path.join(folder, "transfer.png"))
        if cfg.units is not None:
            from .robust.units import unit_images

            u = unit_images(models[cfg.units.model], cfg.units.layer, x, k=cfg.units.k, seed=cfg.seed)
            u.save(folder, prefix=f"units_{cfg.units.model}")
            monitor.image_grid(f"units/{cfg.units.model}_unit{u.unit}", u.unit_grid.unsqueeze(0), 0)
            monitor.image_grid(f"units/{cfg.units.model}_random_direction", u.direction_grid.unsqueeze(0), 0)

    with tempfile.TemporaryDirectory() as tmp:
        write(tmp)
        store.upload_dir(tmp, "")
    monitor.close()
    print(to_markdown(rows))
    print(
        "error rates (%) of each column model on each row's examples (fooled: % of the images its source gets "
        f"right that fool it; distortion: over those); table, heatmap in {store.uri}"
    )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from .config import TrainConfig

    p = sub.add_parser("train", help="train a genotype's network or a named model with an AT strategy")
    src = p.add_mutually_exclusive_group()  # one of them, unless --out URI --resume
    src.add_argument("--genotype", help="genotype.json (path/URI) or a search's storage URI")
    src.add_argument("--model", help="small_cnn | mlp | resnet18 | resnet34 | resnet50")
    p.add_argument(
        "--strategy",
        help="standard | fgsm | fgsm_rs | fgm | pgd | free | yopo | freelb | trades "
        "(default: the --config file's strategy.strategy, else standard)",
    )
    p.add_argument(
        "--eps",
        type=_positive_float,
        help=f"attack budget of an adversarial --strategy (default: the --config file's strategy.eps, else the "
        f"strategy's own: {_strategy_budgets()}); refused with standard, which uses none",
    )
    p.add_argument(
        "--epochs",
        type=int,
        help=f"epochs (default: the --config file's, else {TrainConfig.model_fields['epochs'].default}); an epoch "
        "of free replays each batch m = 8 times, so Shafahi et al. give it the standard epochs / m",
    )
    p.add_argument("--config", help="optional TrainConfig YAML (data, model, strategy, optim, eval, storage, monitor)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config key"
    )
    p.add_argument(
        "--out",
        type=out_uri,
        help="storage URI of the run (default: the --config file's storage.uri, else "
        "runs/train_<--model, or the genotype's file or search folder name>_<strategy>)",
    )
    add_resume_args(p)
    add_threads_arg(p, "the --config file's threads")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("transfer", help="Szegedy transfer table: each model's adversarial examples against the others")
    p.add_argument("--config", required=True, help="TransferConfig YAML (see launch/configs/transfer_mnist.yaml)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config key"
    )
    p.add_argument("--out", type=out_uri, help="storage URI (default: the config's storage.uri)")
    add_threads_arg(p)
    p.set_defaults(func=cmd_transfer)
