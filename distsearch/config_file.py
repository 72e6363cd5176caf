"""Config files: read a YAML file, apply `--set key.sub=value` overrides, tell which command a
file is for, and validate it against a schema of config.py, turning pydantic's errors into one
line naming the field (`format_validation_error`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import ValidationError

from .config import OptimConfig, RunConfig, SearchConfig, TrainConfig, TrainOptimConfig
from .config_transfer import TransferConfig
from .errors import UsageError

if TYPE_CHECKING:  # storage imports torch: not at import time here
    from .storage import Store


def format_validation_error(err: ValidationError, prefix: str = "config") -> str:
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"] if not (isinstance(p, str) and p in ("darts", "lease", "dsrna")))
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "extra_forbidden":
        msg = "unknown key (remove it or check its spelling)"
    elif e["type"] == "union_tag_invalid":
        msg, loc = "must be one of 'darts', 'lease', 'dsrna'", f"{loc}.name" if loc else "name"
    elif "input" in e and e["type"] not in ("missing",) and not isinstance(e["input"], dict):
        msg = f"{msg} (got {e['input']!r})"
    extra = f" ({len(err.errors()) - 1} more error(s))" if len(err.errors()) > 1 else ""
    where = f"{loc}: " if loc and not msg.startswith(f"{loc}.") else ""  # whole-model checks name their fields
    return f"{prefix} error: {where}{msg}{extra}"


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.sub=value` overrides (values parsed as YAML) to a raw config dict."""
    for item in overrides:
        if "=" not in item:
            raise UsageError(f"--set {item!r}: expected key=value, e.g. --set epochs=3")
        key, value = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        if not all(parts):
            raise UsageError(f"--set {item!r}: {key.strip()!r} is not a key; expected key.sub=value, e.g. epochs=3")
        if parts[:2] == ["tune", "params"] and len(parts) > 3:  # the sampled keys are dotted themselves
            kind = parts[-1:] if parts[-1] in ("choice", "grid", "uniform", "loguniform") else []
            parts = [*parts[:2], ".".join(parts[2 : len(parts) - len(kind)]), *kind]
        for p in parts[:-1]:
            if not isinstance(node.get(p, {}), dict):
                raise UsageError(f"--set {key}: {p!r} is not a section")
            node = node.setdefault(p, {})
        node[parts[-1]] = _parse_value(value)
    return raw


class _DuplicateKey(Exception):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys in a mapping without a word: a file that sets
    `epochs` twice would run with whichever came last."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                line = key_node.start_mark.line + 1
                raise _DuplicateKey(f"{key!r} is set twice (lines {seen[key]} and {line}); keep one")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UsageError(
            f"--config: {str(p)!r} is a folder; give a YAML file"
            if p.is_dir()
            else f"--config: no such file {str(p)!r}"
        )
    try:
        raw = yaml.load(p.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}  # a SafeLoader
    except _DuplicateKey as e:
        raise UsageError(f"--config: {p}: {e}") from None
    except UnicodeDecodeError:
        raise UsageError(f"--config: {p} is not a UTF-8 text file") from None
    except yaml.YAMLError as e:
        raise UsageError(f"--config: {p} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise UsageError(f"--config: {p} must hold a mapping of config keys")
    if not raw:  # not the defaults' full-size job by accident (a 50-epoch search for a search config)
        raise UsageError(f"--config: {p} sets no keys; give the keys to set (launch/configs/ has examples)")
    return raw


# Top-level keys (and optim keys) only one kind of config file has; the rest (name, seed,
# data, storage, monitor, eval ...) are shared and say nothing about the kind.
_KIND_KEYS = {
    "search": {"space", "algorithm", "weight_at", "precision", "channels_last", "cuda_graph"},
    "train": {"model", "strategy"},
    "transfer": {"models", "attack", "units", "lr", "n"},
}
_KIND_OPTIM_KEYS = {  # grad_clip is both's
    "search": set(OptimConfig.model_fields) - set(TrainOptimConfig.model_fields),
    "train": set(TrainOptimConfig.model_fields) - set(OptimConfig.model_fields),
}
# the command that reads each kind, and the kinds each schema reads
KIND_COMMAND = {"search": "search", "experiment": "run", "train": "train", "transfer": "transfer"}
SCHEMA_KINDS: dict[type[RunConfig], tuple[str, ...]] = {
    SearchConfig: ("search", "experiment"),
    TrainConfig: ("train",),
    TransferConfig: ("transfer",),
}


def config_kind(raw: dict[str, Any]) -> str | None:
    """'search', 'experiment' (a search config with `tune:`), 'train' or 'transfer' when the
    keys of a config file say so unambiguously; None when they do not (shared keys only, or mixed)."""
    optim = raw.get("optim")
    optim_keys = set(optim) if isinstance(optim, dict) else set()
    kinds = {
        kind for kind, keys in _KIND_KEYS.items() if keys & set(raw) or optim_keys & _KIND_OPTIM_KEYS.get(kind, set())
    }
    if "tune" in raw:
        kinds.add("search")
    if len(kinds) != 1:
        return None
    kind = kinds.pop()
    return "experiment" if kind == "search" and "tune" in raw else kind


def check_kind(raw: dict[str, Any], schema: type[RunConfig], path: str | Path) -> None:
    """A config file of another kind than `schema` reads: one line naming the command that reads it."""
    kind = config_kind(raw)
    if kind is None or kind in SCHEMA_KINDS.get(schema, (kind,)):
        return
    what = "an experiment file (a search config with tune:)" if kind == "experiment" else f"a {kind} config"
    raise UsageError(f"--config: {path} is {what}; use `distsearch {KIND_COMMAND[kind]} --config {path}`")


def parse_config(raw: dict[str, Any], schema: type[RunConfig] = SearchConfig) -> Any:
    try:
        return schema.model_validate(raw)
    except ValidationError as e:
        raise UsageError(format_validation_error(e)) from None


def load_config(path: str | Path, overrides: list[str] | None = None, schema: type[RunConfig] = SearchConfig) -> Any:
    raw = read_yaml(path)
    check_kind(raw, schema, path)  # the file's own keys, before --set adds any
    return parse_config(apply_overrides(raw, overrides or []), schema)


# What a resume may change without changing the run it continues: how long, where, how fast, what
# is logged. Everything else (seed, data, space, algorithm, optimisers, eval ...) makes it another run.
RESUME_MAY_CHANGE = (
    "epochs",
    "threads",
    "device",
    "name",
    "monitor.",
    "storage.",
    "data.root",
    "data.path",
    "data.download",
    "data.eval_batch_size",
)


def _leaves(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict) or not d:
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_leaves(v, f"{prefix}{k}."))
    return out


def resume_changes(stored: dict[str, Any], cfg: RunConfig) -> list[str]:
    """'key: old -> new' for each value of a run's stored config that `cfg` changes, except
    RESUME_MAY_CHANGE. The stored config is read as this version reads it, so a field added since
    (at its default, which keeps the old behaviour) is no change."""
    try:
        stored = type(cfg).model_validate(stored).model_dump(mode="json")
    except ValueError:  # a field since renamed or removed: compare as written
        pass
    old, new = _leaves(stored), _leaves(cfg.model_dump(mode="json"))
    sections = tuple(k for k in RESUME_MAY_CHANGE if k.endswith("."))
    return [
        f"{key}: {old.get(key, '(unset)')!r} -> {new.get(key, '(unset)')!r}"
        for key in sorted(old.keys() | new.keys())
        if old.get(key) != new.get(key) and key not in RESUME_MAY_CHANGE and not key.startswith(sections)
    ]


def run_command(raw: dict[str, Any]) -> str:
    """The command that writes (and resumes) a run whose config.json is `raw`: train or search."""
    return "train" if "model" in raw else "search"


def occupied(store: Store, command: str, field: str) -> UsageError:
    """The error for a new `distsearch <command>` run on a store that holds one: continue it with
    --resume, or, when it is the other command's run, with that command."""
    kind = run_command(store.read_config()) if store.exists("config.json") else command
    if kind == command:
        return UsageError(
            f"{field}: {store.uri} already holds a {command} run; pass --resume to continue it or choose "
            f"another {field}"
        )
    return UsageError(
        f"{field}: {store.uri} holds a {kind} run (continue it: distsearch {kind} --out {store.uri} --resume); "
        f"choose another {field}"
    )


def stored_config(uri: str, command: str, overrides: list[str]) -> dict[str, Any]:
    """The raw config.json of the run at `uri` with `overrides` applied, for `distsearch <command>
    --out URI --resume` without --config; one line when there is no such run, it is another
    command's, it names no epochs (a hand edit: the default would set the run's length), or this
    version of distsearch cannot read it."""
    from .runner import recorded_config
    from .storage import Store

    store = Store(uri, field="--out")
    if store.exists("config.json"):
        raw = store.read_config()
    else:  # deleted by hand: the newest valid checkpoint's record, when it has one
        if store.exists("distsearch_experiment.json"):
            raise UsageError(f"--out: {uri} is an experiment root; continue it with `distsearch resume {uri}`")
        latest = store.load_latest() if store.list_checkpoints() else None
        raw = recorded_config(latest)
        if raw is None:
            fix = "give --config FILE --resume to continue its checkpoints" if latest else "give --config to start one"
            raise UsageError(f"--out: {uri} holds no run to resume (no config.json); {fix}")
    kind = run_command(raw)
    if kind != command:
        raise UsageError(f"--out: {uri} holds a {kind} run; continue it: distsearch {kind} --out {uri} --resume")
    try:
        (TrainConfig if kind == "train" else SearchConfig).model_validate(raw)
    except ValidationError as e:
        raise UsageError(
            f"--out: {uri}/config.json does not load in this version of distsearch "
            f"({format_validation_error(e, prefix='its')}); resume it with the version that wrote it, or "
            "continue with a current config: --config FILE --resume --allow-changes"
        ) from None
    raw = apply_overrides(raw, overrides)
    if "epochs" not in raw:
        raise UsageError(f"--out: {uri}/config.json names no epochs; say how many the run should reach: --set epochs=N")
    return raw
