"""Command line: `distsearch search|derive|validate` here; other command groups register
themselves from their own modules (robust, certify, distributed) via `COMMAND_MODULES`.

Every bad config, flag or URI prints one line naming the field and what is allowed and
exits with code 2, before anything is written.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Sequence

from search_spaces import GenotypeError

from .data import DataError
from .errors import UsageError, out_uri

# Modules with `register(subparsers)`; each adds its commands with set_defaults(func=...).
COMMAND_MODULES: tuple[str, ...] = ("distsearch.cli_robust", "distsearch.report", "distsearch.distributed.cli")


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage too)
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="experiment YAML (see launch/configs/)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set epochs=3 --set space.C=8 (repeatable)",
    )


def cmd_validate(args: argparse.Namespace) -> int:
    from .config import SearchConfig, TrainConfig, TransferConfig, apply_overrides, parse_config, read_yaml

    raw = apply_overrides(read_yaml(args.config), args.overrides)
    schema = TransferConfig if "models" in raw else TrainConfig if "model" in raw else SearchConfig
    cfg = parse_config(raw, schema)
    if schema is not SearchConfig:
        print(f"ok: {cfg.name}: {schema.__name__} on {cfg.data.name}, {cfg.epochs} epochs, storage {cfg.storage.uri}")
        return 0
    print(
        f"ok: {cfg.name}: {cfg.algorithm.name} on {cfg.data.name}, {cfg.epochs} epochs, "
        f"C={cfg.space.C} layers={cfg.space.layers} nodes={cfg.space.nodes}, storage {cfg.storage.uri}"
    )
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from .config import load_config
    from .runner import run_search
    from .storage import Store

    overrides = list(args.overrides) + ([f"storage.uri={args.out}"] if args.out else [])
    cfg = load_config(args.config, overrides)
    store = Store(cfg.storage.uri)
    if store.list_checkpoints() and not args.resume:
        raise UsageError(
            f"--out: {cfg.storage.uri} already holds a search; pass --resume to continue it or choose another --out"
        )
    store.check_writable()
    result = run_search(cfg, store)
    print(f"genotype ({result.epochs} epochs, val acc {result.metrics.get('val/acc', float('nan')):.4f}):")
    print(result.genotype.to_json())
    print(f"written to {store.uri}/genotype.json")
    if store.is_local:
        print(f"TensorBoard: tensorboard --logdir {store.path('tb')}")
    else:
        print(f"TensorBoard: distsearch tensorboard {store.uri}  (or tensorboard --logdir {store.uri}/tb)")
    return 0


def cmd_derive(args: argparse.Namespace) -> int:
    from .storage import Store

    store = Store(args.uri)
    latest = store.load_latest()
    if latest is None:
        raise UsageError(f"URI: no valid checkpoint under {args.uri!r}; point it at a search's --out folder")
    name, _, meta = latest
    if "genotype" not in meta:
        raise UsageError(f"URI: {args.uri!r} is not a search (a training run?): its checkpoints hold no genotype")
    print(json.dumps(meta["genotype"], indent=2))
    print(f"# from {name} (epoch {meta['epoch']}, step {meta['global_step']})", file=sys.stderr)
    return 0


def build_parser() -> Parser:
    parser = Parser(prog="distsearch", description="Search robust neural architectures (DARTS, LeaSE, DSRNA).")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    p = sub.add_parser("search", help="run one search in this process")
    add_config_args(p)
    p.add_argument("--out", type=out_uri, help="storage URI (overrides storage.uri): a path, file://, s3://, gs://")
    p.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint in --out")
    p.set_defaults(func=cmd_search)
    p = sub.add_parser("derive", help="print the genotype of the newest checkpoint under URI")
    p.add_argument("uri", help="a search's --out (path, file://, s3://, gs://)")
    p.set_defaults(func=cmd_derive)
    p = sub.add_parser("validate", help="check a config file and exit")
    add_config_args(p)
    p.set_defaults(func=cmd_validate)
    for mod in COMMAND_MODULES:
        importlib.import_module(mod).register(sub)
    return parser


STORAGE_ERRORS = ("botocore", "aiobotocore", "s3fs", "gcsfs", "google")  # a remote store failing, not our code


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return int(args.func(args) or 0)
    except (UsageError, DataError, GenotypeError) as e:
        print(f"distsearch {args.command}: {' '.join(str(e).split())}", file=sys.stderr)  # one line
        return 2
    except Exception as e:
        if not type(e).__module__.startswith(STORAGE_ERRORS):
            raise
        msg = " ".join(str(e).split())
        print(
            f"distsearch {args.command}: storage: {type(e).__name__}: {msg}; check the endpoint, credentials "
            "and bucket (a run continues with --resume)",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun with --resume to continue from the last checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
