"""Command line: `distsearch search|derive|validate` here; other command groups register
themselves from their own modules (robust, certify, distributed) via `COMMAND_MODULES`.

Every bad config, flag or URI prints one line naming the field and what is allowed and
exits with code 2, before anything is written.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import logging
import posixpath
import shlex
import sys
from collections.abc import Sequence
from typing import Any

from search_spaces import GenotypeError

from . import __version__
from .data import DataError
from .errors import UsageError, out_uri
from .interrupt import Terminated, signals_recorded

# Modules with `register(subparsers)`; each adds its commands with set_defaults(func=...).
COMMAND_MODULES: tuple[str, ...] = (
    "distsearch.cli_train",
    "distsearch.cli_robust",
    "distsearch.report",
    "distsearch.pack",
    "distsearch.distributed.cli",
)


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage too)
        self.exit(2, f"{self.prog}: error: {message}\n")


CONFIG_HELP = {
    "run": "experiment YAML: a search config with a tune: section (see launch/experiments/)",
    "submit": "experiment YAML: a search config with a tune: section (see launch/experiments/)",
    "validate": "any config YAML: search or transfer (launch/configs/), experiment (launch/experiments/), training",
    "search": "search config YAML (see launch/configs/); not needed with --out URI --resume",
}


def add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    command = p.prog.split()[-1]
    help_ = CONFIG_HELP.get(command, "search config YAML (see launch/configs/)")
    p.add_argument("--config", required=required, help=help_)
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set epochs=3 --set space.C=8 (repeatable)",
    )


def add_threads_arg(p: argparse.ArgumentParser, default: str = "the config's threads") -> None:
    p.add_argument(
        "--threads",
        type=_positive_int,
        help=f"torch intra-op threads (default: {default}; unset there: torch's default, all cores)",
    )


def add_resume_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest valid checkpoint in --out, with the config the run has there "
        "(config.json, the flags and --set applied) unless --config is given",
    )
    p.add_argument(
        "--allow-changes",
        action="store_true",
        help="with --resume: continue even where --config/--set change values the run ran with "
        "(anything beyond epochs, threads, device, name, monitor, storage, data.root / path / download / "
        "eval_batch_size)",
    )


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {v}")
    return v


def refuse_unfit_out(uri: str, flag: str = "--out", runs_here: bool = True) -> None:
    """An --out no run writes into: a `distsearch run` experiment root (<storage>/<name>: a run
    there would hide the experiment's trials from `report`), a folder inside a run (its
    checkpoints/, tb/, a sub-folder: `status`, `report` and TensorBoard would mix the two), and
    for a command that writes no run there (`runs_here` False: transfer) a run's own folder."""
    from .distributed.tuner import EXPERIMENT_FILE  # a constant: no ray imported
    from .storage import Store

    store = Store(uri, field=flag)
    if store.exists(EXPERIMENT_FILE):
        raise UsageError(
            f"{flag}: {uri} is the root of a `distsearch run` experiment (it holds {EXPERIMENT_FILE}); "
            "choose another folder"
        )
    if not runs_here and store.exists("config.json"):
        raise UsageError(f"{flag}: {uri} holds a search or training run; choose another folder")
    refuse_inside_run(store, flag)


def refuse_inside_run(store: Any, flag: str) -> None:
    """A folder inside a search's or training's (its checkpoints/, tb/, a sub-folder) is refused."""
    path, fs = store.root.rstrip("/"), store.fs
    parent = posixpath.dirname(path)
    while parent and parent != path:  # up to the file system's or the bucket's root
        if fs.exists(posixpath.join(parent, "config.json")) and fs.exists(posixpath.join(parent, "checkpoints")):
            raise UsageError(f"{flag}: {store.uri} lies inside the run at {parent}; choose a folder outside it")
        path, parent = parent, posixpath.dirname(parent)


def check_data_here(cfg: Any, search: bool, strict: bool = False) -> None:
    """validate, and `run` before Ray starts: the data set read as the run reads it and its batch
    streams built (batch size against the splits, cutout against npz images). Where the run would
    stop on this machine only (torchvision files missing, no GPU for device cuda): a note, the
    config may be for another; with `strict` (trials on this machine) the error."""
    import torch

    from .data import TORCHVISION_SETS, BatchStream, bilevel_split
    from .runner import build_data

    if cfg.device == "cuda" and not torch.cuda.is_available():
        print("note: device: cuda, and no GPU is visible here", file=sys.stderr)
    try:  # never a download from validate
        data = build_data(cfg.model_copy(update={"data": cfg.data.model_copy(update={"download": False})}))
    except DataError as e:
        if strict or cfg.data.name not in TORCHVISION_SETS:
            raise
        fetch = f"no {cfg.data.name} files under {cfg.data.root} yet; data.download fetches them when the run starts"
        print(f"note: {fetch if cfg.data.download else f'{e} (a run on this machine stops there)'}", file=sys.stderr)
        return
    n = len(data.x_train)
    for idx in bilevel_split(n, cfg.data.train_portion) if search else (torch.arange(n),):
        BatchStream(data.x_train, data.y_train, idx, cfg.data.batch_size, 0, "cpu", cutout=cfg.data.cutout)


def cmd_validate(args: argparse.Namespace) -> int:
    from .config import SearchConfig, TrainConfig
    from .config_file import apply_overrides, config_kind, parse_config, read_yaml
    from .config_transfer import TransferConfig

    raw = read_yaml(args.config)
    kind = config_kind(raw) or ("transfer" if "models" in raw else "train" if "model" in raw else "search")
    schema = {"transfer": TransferConfig, "train": TrainConfig}.get(kind, SearchConfig)
    cfg = parse_config(apply_overrides(raw, args.overrides), schema)
    from .data_npz import check_files

    check_files(cfg)  # as `run` does before Ray starts
    from .storage import check_protocol

    check_protocol(cfg.storage.uri, "storage.uri")
    if schema is SearchConfig and cfg.tune is not None:
        check_protocol(cfg.tune.storage, "tune.storage")
    if schema is not TransferConfig:
        check_data_here(cfg, search=schema is SearchConfig)
    if schema is not SearchConfig:
        uri = cfg.storage.uri
        if schema is TrainConfig and "uri" not in cfg.storage.model_fields_set:
            from .cli_train import default_train_out

            uri = default_train_out(cfg)  # where `distsearch train --config` without --out writes
        print(f"ok: {cfg.name}: {schema.__name__} on {cfg.data.name}, {cfg.epochs} epochs, storage {uri}")
        return 0
    where = f"storage {cfg.storage.uri}"
    if cfg.tune is not None:  # the trials go under the experiment root, not storage.uri
        from .distributed.tuner import experiment_spec  # no ray imported

        root = experiment_spec(cfg)["root"]  # its name checked as `run` checks it
        where = f"experiment root {root} (one folder per trial; `distsearch run --storage/--name` move it)"
    print(
        f"ok: {cfg.name}: {cfg.algorithm.name} on {cfg.data.name}, {cfg.epochs} epochs, "
        f"C={cfg.space.C} layers={cfg.space.layers} nodes={cfg.space.nodes}, {where}"
    )
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from .config_file import load_config, occupied, parse_config, stored_config
    from .distributed.trainable import experiment_of  # layout only: no ray imported
    from .driver_lease import DriverLease
    from .runner import run_search
    from .storage import Store

    overrides = list(args.overrides) + ([f"storage.uri={args.out}"] if args.out else [])
    overrides += [f"threads={args.threads}"] if args.threads else []
    if args.config:
        cfg = load_config(args.config, overrides)
    elif args.resume and args.out:  # continue the run as it ran: its own config.json
        cfg = parse_config(stored_config(args.out, "search", overrides))
    else:
        raise UsageError("--config: required (or --out URI --resume, to continue a search from its own config.json)")
    refuse_unfit_out(cfg.storage.uri, "--out" if args.out else "storage.uri")
    if cfg.tune is not None:
        print(
            f"note: {args.config} is an experiment file: `search` runs one search of its base config "
            "and ignores `tune:` (`distsearch run --config ...` runs the experiment)",
            file=sys.stderr,
        )
    store = Store(cfg.storage.uri, field="--out" if args.out else "storage.uri")
    args.store_uri = store.uri  # for the hint after an interruption
    if store.list_checkpoints() and not args.resume:
        raise occupied(store, "search", "--out" if args.out else "storage.uri")
    store.check_writable()
    experiment = experiment_of(store)  # a trial's store: not beside the experiment's live driver
    with DriverLease(store, "search", "--out" if args.out else "storage.uri", (experiment,) if experiment else ()):
        result = run_search(cfg, store, allow_changes=args.allow_changes)
    epochs = f"{result.epochs} epoch{'s' * (result.epochs != 1)}"
    print(f"genotype ({epochs}, val acc {result.metrics.get('val/acc', float('nan')):.4f}):")
    print(result.genotype.to_json())
    print(f"written to {store.uri}/genotype.json")
    if store.is_local:
        print(f"TensorBoard: tensorboard --logdir {store.path('tb')}")
    else:
        print(f"TensorBoard: distsearch tensorboard {store.uri}  (or tensorboard --logdir {store.uri}/tb)")
    return 0


def cmd_derive(args: argparse.Namespace) -> int:
    from .report import run_at
    from .storage import Store

    store = Store(args.uri, field="URI")
    store = run_at(store) or store  # an experiment's trial folder: its search
    latest = store.load_latest()
    if latest is None:
        if store.exists("config.json"):  # a search stopped before its first checkpoint, or none verifies
            raise UsageError(
                f"URI: {args.uri!r} holds a run without a valid checkpoint yet; continue it "
                f"(`distsearch search --out {args.uri} --resume`), then derive"
            )
        raise UsageError(f"URI: no valid checkpoint under {args.uri!r}; point it at a search's --out folder")
    name, _, meta = latest
    if "genotype" not in meta:
        raise UsageError(f"URI: {args.uri!r} is not a search (a training run?): its checkpoints hold no genotype")
    print(json.dumps(meta["genotype"], indent=2))
    print(f"# from {name} (epoch {meta['epoch']}, step {meta['global_step']})", file=sys.stderr)
    return 0


def build_parser() -> Parser:
    parser = Parser(prog="distsearch", description="Search robust neural architectures (DARTS, LeaSE, DSRNA).")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level (also after the command)")
    parser.add_argument("--version", action="version", version=f"distsearch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    p = sub.add_parser("search", help="run one search in this process")
    add_config_args(p, required=False)
    p.add_argument(
        "--out",
        type=out_uri,
        help="storage URI (default: the config's storage.uri): a path, file://, s3://, gs://",
    )
    add_resume_args(p)
    add_threads_arg(p)
    p.set_defaults(func=cmd_search)
    p = sub.add_parser("derive", help="print the genotype of the newest checkpoint under URI")
    p.add_argument("uri", help="a search's --out (path, file://, s3://, gs://)")
    p.set_defaults(func=cmd_derive)
    p = sub.add_parser("validate", help="check a config file and exit")
    add_config_args(p)
    p.set_defaults(func=cmd_validate)
    for mod in COMMAND_MODULES:
        importlib.import_module(mod).register(sub)
    for command in sub.choices.values():  # -v after the command too; SUPPRESS keeps one given before it
        command.add_argument(
            "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log at INFO level"
        )
    return parser


# a remote store failing, not our code
STORAGE_ERRORS = ("botocore", "aiobotocore", "aiohttp", "s3fs", "gcsfs", "google")


RESUME_HINT = {  # how each long command continues after an interruption
    "search": "continue from the last checkpoint with `distsearch search --out {out} --resume{allow}{sets}`",
    "train": "continue from the last checkpoint with `distsearch train --out {out} --resume{allow}{sets}`",
    "run": "continue with `distsearch resume {out}`",
    "resume": "continue with `distsearch resume {out}`",
}


OWN_LOOP = ("search", "train")  # commands whose loop runs in this process (Ray runs the others' trials)


def _holds_run(where: str | None) -> bool | None:
    """Whether `where` holds a run's config.json; None when the store cannot be asked."""
    if not where:
        return False
    from .storage import Store

    try:
        return Store(where).exists("config.json")
    except Exception:  # noqa: BLE001 - unreachable, no credentials
        return None


def _hint(args: argparse.Namespace, default: str) -> str:
    """How to continue `args.command` at its store (`args.store_uri`, set once the command knows it)."""
    where = getattr(args, "store_uri", None) or getattr(args, "out", None) or getattr(args, "uri", None)
    holds = _holds_run(where) if args.command in OWN_LOOP else True
    if holds is False:
        return "rerun the same command (nothing was saved yet)"
    allow = " --allow-changes" if getattr(args, "allow_changes", False) else ""
    # the values given again: a resume stopped before it wrote them (config.json, a checkpoint) would
    # otherwise continue without them; where they were written, they change nothing
    sets = f" --epochs {args.epochs}" if args.command == "train" and getattr(args, "epochs", None) else ""
    sets += "".join(f" --set {shlex.quote(s)}" for s in getattr(args, "overrides", None) or [])
    hint = RESUME_HINT.get(args.command, default).replace("{out}", where or "<storage>/<name>")
    hint = hint.replace("{allow}", allow).replace("{sets}", sets)
    return hint if holds else f"rerun the same command, or if it had saved a checkpoint, {hint}"  # unreachable store


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # bare `distsearch`: the commands, and exit 2
        parser.print_help(sys.stderr)
        print("distsearch: error: give a command; `distsearch COMMAND --help` shows its options", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        # SIGTERM as an interruption where we own the loop; a Ray driver leaves it to Ray
        with signals_recorded(sigterm=args.command in OWN_LOOP):
            return int(args.func(args) or 0)
    except (UsageError, DataError, GenotypeError) as e:
        print(f"distsearch {args.command}: {' '.join(str(e).split())}", file=sys.stderr)  # one line
        return 2
    except Exception as e:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):  # a full disk or quota
            print(f"distsearch {args.command}: {e}; free space, then {_hint(args, 'rerun it')}", file=sys.stderr)
            return 1
        if not type(e).__module__.startswith(STORAGE_ERRORS):
            raise
        msg = " ".join(str(e).split())
        print(
            f"distsearch {args.command}: storage: {type(e).__name__}: {msg}; check the endpoint, credentials "
            f"and bucket ({_hint(args, 'then rerun')})",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt as e:
        what, rc = ("terminated (SIGTERM)", 143) if isinstance(e, Terminated) else ("interrupted", 130)
        print(f"{what}: {_hint(args, 'rerun it')}", file=sys.stderr)
        return rc


if __name__ == "__main__":
    sys.exit(main())
