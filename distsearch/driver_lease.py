"""One process per run: `search`, `train`, and an experiment's `run` / `resume` driver hold a
lease file under the run's store (<store>/drivers/), refreshed by a heartbeat thread, so that a
second process refuses to start beside a live one (two `search --resume` on one --out, two
`run`s of one name) and `distsearch status` can tell a running experiment from an interrupted one.

A claim writes its own lease, then lists the folder: a process that sees any other live lease
gives up and removes its own. Of two racing claims the later write always sees the earlier
one, so at most one wins (both may lose; the message says to retry). A lease is live while
its heartbeat is younger than STALE_S and, on this host, while its process exists (a process
killed with SIGKILL on this machine stops counting at once). Leases that are not live are
deleted by the next claim. Works on every Store (local, S3, GCS, memory); needs no Ray.
"""

from __future__ import annotations

import os
import posixpath
import socket
import threading
import time
import uuid
from typing import Any

from .errors import UsageError
from .storage import Store

LEASE_DIR = "drivers"
BEAT_S = 10.0  # heartbeat period
STALE_S = 60.0  # a lease not refreshed for this long is dead (its host's clock may differ a little)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def is_live(lease: dict[str, Any], now: float | None = None, stale_s: float = STALE_S) -> bool:
    now = time.time() if now is None else now
    if now - float(lease.get("beat", 0)) > stale_s:
        return False
    return lease.get("host") != socket.gethostname() or _pid_alive(int(lease.get("pid", -1)))


def describe(lease: dict[str, Any], now: float | None = None) -> str:
    now = time.time() if now is None else now
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(lease["started"])))
    return (
        f"`{lease.get('command', 'run')}` pid {lease['pid']} on {lease['host']}, "
        f"started {started}, last heartbeat {now - float(lease['beat']):.0f} s ago"
    )


def leases(store: Store) -> list[tuple[str, dict[str, Any]]]:
    """(file name, lease) for every readable lease under the experiment's drivers/ folder."""
    folder = store.path(LEASE_DIR)
    store.fs.invalidate_cache(folder)  # object stores: list what is there now, not a cached listing
    try:
        names = [posixpath.basename(p) for p in store.fs.ls(folder, detail=False)]
    except FileNotFoundError:
        return []
    out = []
    for name in sorted(names):
        if not name.endswith(".json"):
            continue  # a local write's temporary file
        try:
            out.append((name, store.read_json(posixpath.join(LEASE_DIR, name))))
        except (FileNotFoundError, ValueError):
            continue  # released meanwhile, or half-written by a killed driver
    return out


def live_drivers(store: Store) -> list[dict[str, Any]]:
    now = time.time()
    return [lease for _, lease in leases(store) if is_live(lease, now)]


class DriverLease:
    """`with DriverLease(store, "run"):` holds the store for this process (see module doc);
    `field` names the user's input in the refusal (URI, --out)."""

    def __init__(
        self, store: Store, command: str, field: str = "URI", beat_s: float = BEAT_S, stale_s: float = STALE_S
    ):
        self.store, self.command, self.field, self.beat_s, self.stale_s = store, command, field, beat_s, stale_s
        self.token = uuid.uuid4().hex[:12]
        self.file = posixpath.join(LEASE_DIR, f"{self.token}.json")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._made_root = False
        self.record = {
            "token": self.token,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "command": command,
            "started": time.time(),
        }

    def _write(self) -> None:
        for attempt in range(3):
            try:
                return self.store.write_json(self.file, dict(self.record, beat=time.time()))
            except FileNotFoundError:  # a local drivers/ folder removed by a release just now
                if attempt == 2:
                    raise

    def claim(self) -> DriverLease:
        self._made_root = self.store.is_local and not os.path.exists(self.store.root)
        self._write()
        now = time.time()
        others = [(n, lease) for n, lease in leases(self.store) if lease.get("token") != self.token]
        live = [lease for _, lease in others if is_live(lease, now, self.stale_s)]
        if live:
            self._remove(self.file)
            raise UsageError(
                f"{self.field}: {self.store.uri} is in use by another process ({describe(live[0], now)}); wait "
                f"for it to end, stop it (Ctrl-C or kill {live[0]['pid']}), or retry if both started together"
            )
        for name, _ in others:  # dead drivers' leases (killed, or their host gone)
            self._remove(posixpath.join(LEASE_DIR, name))
        self._thread = threading.Thread(target=self._beat, name="distsearch-lease", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.beat_s):
            try:
                self._write()
            except Exception:  # noqa: BLE001 - a storage hiccup: the next beat tries again
                pass

    def _remove(self, rel: str) -> None:
        try:
            self.store.fs.rm(self.store.path(rel))
        except FileNotFoundError:
            pass

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._remove(self.file)
        if self.store.is_local:  # leave no empty drivers/ folder, nor a run folder the claim made
            for folder in [self.store.path(LEASE_DIR)] + [self.store.root] * self._made_root:
                try:
                    os.rmdir(folder)
                except OSError:
                    break  # another process's lease is there, the run wrote files, or it is gone

    def __enter__(self) -> DriverLease:
        return self.claim()

    def __exit__(self, *exc: object) -> None:
        self.release()
