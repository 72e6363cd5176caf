"""Checkpoints and results on any fsspec URI (local paths, file://, memory://, s3://, gs://).

Layout under a store's root:
    config.json                       the resolved config of the run
    checkpoints/ckpt-<step>/          state.pt (torch.save), meta.json, MANIFEST.json
    genotype.json, result.json        written when the search ends
    tb/                               TensorBoard event files (mirrored for remote stores)
Every file is written atomically (temp file + rename locally; one PUT on object stores) and
a checkpoint exists only once its MANIFEST.json (sha256 and size of each file) is written,
last. A checkpoint whose files do not match their manifest is reported and skipped, and the
previous one is used. Tensors are read with torch.load(weights_only=True) only: nothing
from storage is ever unpickled. A state that weights_only could not read back (numpy arrays,
dataclasses, ...) is refused before anything is written; such a checkpoint found in storage is
skipped like a corrupt one.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import pickle
import posixpath
import re
import tempfile
import uuid
from typing import Any

import fsspec
import torch

from .errors import UsageError
from .safe_state import check_loadable, read_state, refusal

log = logging.getLogger(__name__)
MANIFEST = "MANIFEST.json"
CKPT_DIR = "checkpoints"
Latest = tuple[str, dict[str, Any], dict[str, Any]] | None  # load_latest: (name, state, meta), or None


class CorruptCheckpoint(RuntimeError):
    """A committed checkpoint that cannot be used (files not matching the manifest, or a state
    weights_only refuses); load_latest and latest report it and fall back to the previous one."""


class UnloadableCheckpoint(CorruptCheckpoint, pickle.UnpicklingError):
    """A checkpoint whose state.pt torch.load(weights_only=True) refuses (objects other than
    tensors and plain Python values): never unpickled. An UnpicklingError too, as torch's own."""


_REQUIRED = object()  # read_json without a default: a missing file raises


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


CKPT_NAME = re.compile(r"ckpt-(\d+)")  # what save_checkpoint names; anything else is not ours


def _step_of(name: str) -> int:
    return int(name.rsplit("-", 1)[-1])


def _cannot_open(uri: str, field: str, e: Exception) -> UsageError:
    return UsageError(f"{field}: cannot open {uri!r} ({e}); use a local path, file://, s3:// or gs://")


def check_protocol(uri: str, field: str) -> None:
    """The error Store(uri) would give for an unknown protocol or a missing package (s3fs, gcsfs),
    without opening the store (a gs:// file system looks for credentials first, for seconds)."""
    protocol = fsspec.core.split_protocol(uri)[0]
    try:
        fsspec.get_filesystem_class(protocol or "file")
    except (ValueError, ImportError) as e:
        raise _cannot_open(uri, field, e) from None


class Store:
    """A run's folder on an fsspec URI. `field` names where the user gave `uri` (a config key or a
    command-line flag); every error about the store starts with it."""

    def __init__(self, uri: str, *, field: str = "storage.uri", **storage_options: Any):
        self.field = field
        try:
            self.fs, self.root = fsspec.core.url_to_fs(uri, **storage_options)
        except (ValueError, ImportError, OSError) as e:  # OSError: a file system that connects at once (ftp)
            raise _cannot_open(uri, field, e) from None
        self.uri = uri
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        self.is_local = protocol in ("file", "local")
        self.root = self.root.rstrip("/")

    def __repr__(self) -> str:
        return f"Store({self.uri!r})"

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts) if parts else self.root

    @property
    def local_root(self) -> str | None:
        return self.root if self.is_local else None

    # -- bytes and JSON ---------------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes) -> None:
        path = self.path(rel)
        parent = posixpath.dirname(path)
        if self.is_local:
            os.makedirs(parent, exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:  # disk full, Ctrl-C: no half-written file left behind
                with contextlib.suppress(OSError):
                    os.remove(tmp)
                raise
        else:
            self.fs.pipe_file(path, data)  # a single PUT: atomic on object stores

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel))

    def exists(self, rel: str = "") -> bool:
        return self.fs.exists(self.path(rel)) if rel else self.fs.exists(self.root)

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=2, sort_keys=True).encode())

    def read_json(
        self, rel: str, default: Any = _REQUIRED, keys: dict[str, type | tuple[type, ...]] | None = None
    ) -> Any:
        """The JSON file `rel`; `default` instead when given and the file does not exist. A file
        that is not JSON (truncated, overwritten), or not an object with `keys` of their types, is
        a UsageError naming it (a ValueError)."""
        try:
            found = json.loads(self.read_bytes(rel))
        except FileNotFoundError:
            if default is _REQUIRED:
                raise
            return default
        except (ValueError, UnicodeDecodeError) as e:
            raise self._damaged(rel, f"is not valid JSON ({e})") from None
        if keys is None:
            return found
        if not isinstance(found, dict):
            raise self._damaged(rel, "is not a JSON object")
        if missing := sorted(set(keys) - found.keys()):
            raise self._damaged(rel, f"lacks {', '.join(map(repr, missing))}")
        if wrong := [k for k, t in keys.items() if not isinstance(found[k], t)]:
            raise self._damaged(rel, f"has {', '.join(f'{k}={found[k]!r}' for k in wrong)} of the wrong type")
        return found

    def _damaged(self, rel: str, what: str) -> UsageError:
        return UsageError(
            f"{self.field}: {self.uri}/{rel} {what}; the store is damaged: restore the file from a copy, or "
            "remove it if the run can do without it"
        )

    def read_config(self) -> dict[str, Any]:
        """The run's config.json as a dict; one clear error when it is damaged or not a run's."""
        raw = self.read_json("config.json")
        if not isinstance(raw, dict) or not isinstance(raw.get("data"), dict):
            raise UsageError(
                f"{self.field}: {self.uri}/config.json is not a distsearch run's config (no 'data' section)"
            )
        return raw

    def upload_dir(self, local_dir: str, rel: str) -> None:
        """Copy every file of a local folder under `rel` (used to mirror TensorBoard files)."""
        for dirpath, _, files in os.walk(local_dir):
            for name in files:
                full = os.path.join(dirpath, name)
                sub = os.path.relpath(full, local_dir).replace(os.sep, "/")
                with open(full, "rb") as f:
                    self.write_bytes(posixpath.join(rel, sub), f.read())

    def check_writable(self) -> None:
        """Fail early (before any work) when the store cannot be written; creates nothing locally."""
        if self.is_local:
            if os.path.exists(self.root) and not os.path.isdir(self.root):
                raise UsageError(f"{self.field}: {self.uri} is a file; give a folder (it is created if missing)")
            parent = self.root
            while not os.path.exists(parent):
                parent = os.path.dirname(parent) or "."
            if not os.path.isdir(parent):  # a file where a folder on the way should be
                raise UsageError(f"{self.field}: {parent} is a file; give a folder (for {self.uri})")
            try:  # a real write (os.access says yes to root, and to read-only or special file systems)
                fd, probe = tempfile.mkstemp(prefix=".probe-", dir=parent)
                os.close(fd)
                os.remove(probe)
            except OSError as e:
                raise UsageError(f"{self.field}: cannot write under {parent!r} (for {self.uri!r}: {e})") from None
            return
        probe = f".probe-{uuid.uuid4().hex}"
        try:
            self.write_bytes(probe, b"ok")
            self.fs.rm(self.path(probe))
        except Exception as e:  # noqa: BLE001 - any backend error means "not usable"
            raise UsageError(f"{self.field}: cannot write to {self.uri!r} ({type(e).__name__}: {e})") from None

    # -- checkpoints ------------------------------------------------------------------------
    def save_checkpoint(self, step: int, state: dict[str, Any], meta: dict[str, Any], keep: int | None = None) -> str:
        """Write checkpoints/ckpt-<step> (state.pt, meta.json, then MANIFEST.json, the commit point)
        and return its name; an existing one of that step is uncommitted first, then replaced.

        state: what load_checkpoint returns, made of tensors and plain Python values (numbers,
            strings, None, lists, tuples, sets, dicts): checked to load with weights_only=True.
        meta: JSON-serialisable facts about the checkpoint (epoch, step, metrics).
        keep: when set, prune to the newest `keep` checkpoints at steps <= `step` afterwards.
        Raises TypeError, before anything is written, when weights_only could not read `state`
        back (naming the key path and type: a numpy array, a Genotype, ...) or `meta` is not JSON.
        """
        name = f"ckpt-{step:010d}"
        buf = io.BytesIO()
        torch.save(state, buf)
        state_pt = buf.getvalue()
        check_loadable(state, state_pt)  # never store what load_checkpoint would refuse
        files = {"state.pt": state_pt, "meta.json": json.dumps(meta, indent=2, sort_keys=True).encode()}
        rel = posixpath.join(CKPT_DIR, name)
        if self.exists(posixpath.join(rel, MANIFEST)):  # rewritten: uncommitted while its files change
            self.fs.rm(self.path(rel, MANIFEST))
        for fname, data in files.items():
            self.write_bytes(posixpath.join(rel, fname), data)
        manifest = {"step": step, "files": {k: {"sha256": _sha256(v), "size": len(v)} for k, v in files.items()}}
        self.write_json(posixpath.join(rel, MANIFEST), manifest)  # the commit point
        if keep:
            self.prune(keep, upto=step)
        return name

    def list_checkpoints(self) -> list[str]:
        """Committed checkpoints (those with a manifest), oldest first. Listed afresh: gcsfs and s3fs
        answer ls and exists from listings this process cached, blind to other processes' writes."""
        return [name for name, committed in self._folders() if committed]

    def _folders(self) -> list[tuple[str, bool]]:
        """(name, committed) of every checkpoint folder, oldest first."""
        base = self.path(CKPT_DIR)
        self.fs.invalidate_cache(base)  # base and its parents; each checkpoint's folder below
        if not self.fs.exists(base):
            return []
        found = []
        for p in self.fs.ls(base, detail=False):
            name = posixpath.basename(p.rstrip("/"))
            self.fs.invalidate_cache(p)
            if CKPT_NAME.fullmatch(name):
                found.append((name, self.fs.exists(posixpath.join(p, MANIFEST))))
        return sorted(found, key=lambda f: _step_of(f[0]))

    def _verified_files(self, name: str) -> dict[str, bytes]:
        rel = posixpath.join(CKPT_DIR, name)
        try:
            manifest = self.read_json(posixpath.join(rel, MANIFEST))
        except (OSError, ValueError) as e:
            raise CorruptCheckpoint(f"{name}: unreadable manifest ({e})") from None
        files = manifest.get("files") if isinstance(manifest, dict) else None
        if not (
            isinstance(files, dict)
            and {"state.pt", "meta.json"} <= files.keys()
            and all(
                isinstance(i, dict) and isinstance(i.get("size"), int) and isinstance(i.get("sha256"), str)
                for i in files.values()
            )
        ):
            raise CorruptCheckpoint(f"{name}: malformed manifest (no size and sha256 for state.pt and meta.json)")
        out = {}
        for fname, info in files.items():
            try:
                data = self.read_bytes(posixpath.join(rel, fname))
            except (OSError, FileNotFoundError):
                raise CorruptCheckpoint(f"{name}: {fname} is missing") from None
            if len(data) != info["size"]:
                how = "truncated" if len(data) < info["size"] else "longer than its manifest says"
                raise CorruptCheckpoint(f"{name}: {fname} is {how} ({len(data)} of {info['size']} bytes)")
            if _sha256(data) != info["sha256"]:
                raise CorruptCheckpoint(f"{name}: {fname} does not match its sha256")
            out[fname] = data
        return out

    def load_checkpoint(
        self, name: str, map_location: str | torch.device = "cpu"
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The (state, meta) of checkpoint `name` (as list_checkpoints names it), its tensors on
        `map_location`. Files are checked against the manifest and state.pt is read with
        torch.load(weights_only=True) only. Raises CorruptCheckpoint when a file is missing, damaged
        or does not match the manifest, and UnloadableCheckpoint (a CorruptCheckpoint and an
        UnpicklingError) when weights_only refuses state.pt."""
        files = self._verified_files(name)
        return self._load_state(name, files["state.pt"], map_location), json.loads(files["meta.json"])

    @staticmethod
    def _load_state(name: str, data: bytes, map_location: str | torch.device) -> Any:
        try:
            return read_state(data, map_location)
        except pickle.UnpicklingError as e:
            raise UnloadableCheckpoint(
                f"{name}: state.pt cannot be read with torch.load(weights_only=True) ({refusal(e)}); "
                "it holds objects other than tensors and plain Python values, and is not unpickled"
            ) from None

    def load_latest(self, map_location: str | torch.device = "cpu") -> Latest:
        """(name, state, meta) of the newest checkpoint that verifies and loads with weights_only
        (see load_checkpoint), its tensors on `map_location`, or None when there is none. Corrupt
        or unloadable ones are logged (a warning naming them and why) and skipped; errors of the
        store itself (unreachable, no permission) are raised."""
        for name in reversed(self.list_checkpoints()):
            try:
                state, meta = self.load_checkpoint(name, map_location)
            except CorruptCheckpoint as e:
                log.warning("skipping corrupt checkpoint %s", e)
                continue
            return name, state, meta
        return None

    def latest(self) -> str | None:
        """The name of the checkpoint load_latest would load (the newest that verifies and loads
        with weights_only), or None; skipped ones are logged as load_latest does. Reads it whole."""
        for name in reversed(self.list_checkpoints()):
            try:
                self._load_state(name, self._verified_files(name)["state.pt"], "cpu")
                return name
            except CorruptCheckpoint as e:
                log.warning("skipping corrupt checkpoint %s", e)
        return None

    def prune(self, keep: int, upto: int | None = None) -> None:
        """Remove all but the newest `keep` checkpoints at steps <= `upto` (default: all), and the
        uncommitted folders (a write or a prune killed midway) below `upto`. Those past `upto`, left
        by an earlier attempt whose checkpoints all failed to verify, are kept: counting them would
        delete the checkpoint just written."""
        folders = [(n, c) for n, c in self._folders() if upto is None or _step_of(n) <= upto]
        committed = [n for n, c in folders if c]
        left = [n for n, c in folders if not c and (upto is None or _step_of(n) < upto)]
        for name in committed[:-keep] + left:
            rel = self.path(CKPT_DIR, name)
            if name in committed:
                self.fs.rm(posixpath.join(rel, MANIFEST))  # uncommit first, then remove the rest
            self.fs.rm(rel, recursive=True)
