"""One process per run: `search`, `train`, and an experiment's `run` / `resume` driver hold a
lease file under the run's store (<store>/drivers/), refreshed by a heartbeat thread, so that a
second process refuses to start beside a live one (two `search --resume` on one --out, two
`run`s of one name) and `distsearch status` can tell a running experiment from an interrupted one.

A claim writes its own lease, then lists the folder (and the `blockers`' folders: an
experiment's root for a search on one of its trial stores, and the reverse): a process that sees
any other live lease gives up and removes its own. Of two racing claims the later write always
sees the earlier one, so at most one wins (both may lose; the message says to retry).

A lease is live, on this host, while its process exists (pid and, on Linux, its start time: a
process suspended with Ctrl-Z still holds it, a SIGKILLed one stops counting at once); from
another host, while its heartbeat is younger than STALE_S. A lease names its store (symlinks
resolved), so one copied on this host along with a run folder does not hold the copy. Leases
that are not live are deleted by the next claim. Works on every Store (local, S3, GCS, memory);
needs no Ray.
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


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux /proc), None elsewhere or gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int, start: str | None = None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        pass
    return start is None or _start_time(pid) in (None, start)  # a reused pid has another start time


def _identity(store: Store) -> str:
    protocol = store.fs.protocol if isinstance(store.fs.protocol, str) else store.fs.protocol[0]
    return f"{protocol}://{os.path.realpath(store.root) if store.is_local else store.root}"  # symlinks resolved


def is_live(lease: dict[str, Any], now: float | None = None, stale_s: float = STALE_S) -> bool:
    if lease.get("host") == socket.gethostname():
        return _pid_alive(int(lease.get("pid", -1)), lease.get("pid_start"))
    now = time.time() if now is None else now
    return now - float(lease.get("beat", 0)) <= stale_s


def describe(lease: dict[str, Any], now: float | None = None) -> str:
    now = time.time() if now is None else now
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(lease["started"])))
    return (
        f"`{lease.get('command', 'run')}` pid {lease['pid']} on {lease['host']}, "
        f"started {started}, last heartbeat {now - float(lease['beat']):.0f} s ago"
    )


def _well_formed(lease: Any) -> bool:
    """A dict with the fields is_live and describe read, of their types."""
    number = (int, float)
    return (
        isinstance(lease, dict)
        and isinstance(lease.get("host"), str)
        and isinstance(lease.get("pid"), int)
        and all(isinstance(lease.get(k), number) and not isinstance(lease.get(k), bool) for k in ("started", "beat"))
    )


def leases(store: Store) -> list[tuple[str, dict[str, Any]]]:
    """(file name, lease) for every readable lease under the store's drivers/ folder; `live` is
    False for one copied here with its folder (written on this host for another path). Paths are
    not compared across hosts (a shared disk may be mounted elsewhere): a lease copied from
    another host goes stale within STALE_S, as its process beats in the original folder."""
    folder = store.path(LEASE_DIR)
    store.fs.invalidate_cache(folder)  # object stores: list what is there now, not a cached listing
    try:
        names = [posixpath.basename(p) for p in store.fs.ls(folder, detail=False)]
    except FileNotFoundError:
        return []
    out, me = [], _identity(store)
    for name in sorted(names):
        if not name.endswith(".json"):
            continue  # a local write's temporary file
        try:
            lease = store.read_json(posixpath.join(LEASE_DIR, name))
        except (FileNotFoundError, ValueError):
            continue  # released meanwhile, or damaged
        if not _well_formed(lease):
            continue  # not a lease this code wrote (leases are written whole, then renamed)
        here = lease.get("store", me) == me or lease.get("host") != socket.gethostname()
        out.append((name, dict(lease, live=here)))
    return out


def live_drivers(store: Store) -> list[dict[str, Any]]:
    now = time.time()
    return [lease for _, lease in leases(store) if lease["live"] and is_live(lease, now)]


class DriverLease:
    """`with DriverLease(store, "run"):` holds the store for this process (see module doc);
    `field` names the user's input in the refusal (URI, --out, --name); a live lease in one of
    the `blockers` stores refuses the claim too."""

    def __init__(
        self,
        store: Store,
        command: str,
        field: str = "URI",
        blockers: tuple[Store, ...] = (),
        beat_s: float = BEAT_S,
        stale_s: float = STALE_S,
    ):
        self.store, self.command, self.field, self.beat_s, self.stale_s = store, command, field, beat_s, stale_s
        self.blockers = blockers
        self.token = uuid.uuid4().hex[:12]
        self.file = posixpath.join(LEASE_DIR, f"{self.token}.json")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._made: list[str] = []  # local folders the claim created (the run's, and parents)
        self.record = {
            "token": self.token,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "pid_start": _start_time(os.getpid()),
            "command": command,
            "store": _identity(store),
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
        folder = self.store.root if self.store.is_local else ""
        while folder and not os.path.exists(folder):
            self._made.append(folder)
            folder = os.path.dirname(folder)
        try:
            self._write()
            return self._hold()
        except BaseException:  # refused, Ctrl-C, SIGTERM: __exit__ will not run, so remove it here
            self.release()
            raise

    def _hold(self) -> DriverLease:
        now = time.time()
        others = [(n, lease) for n, lease in leases(self.store) if lease.get("token") != self.token]
        live = [lease for _, lease in others if lease["live"] and is_live(lease, now, self.stale_s)]
        for blocker in self.blockers:
            live += [dict(lease, at=blocker.uri) for lease in live_drivers(blocker)]
        if live:
            where = f" (it holds {live[0]['at']})" if "at" in live[0] else ""
            raise UsageError(
                f"{self.field}: {self.store.uri} is in use by another process{where} ({describe(live[0], now)}); "
                f"wait for it to end, stop it (Ctrl-C, or kill {live[0]['pid']} on {live[0]['host']}), or retry "
                "if both started together"
            )
        for name, _ in others:  # dead drivers' leases (killed, their host gone, or copied here)
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
        if self.store.is_local:  # leave no empty drivers/ folder, nor the folders the claim made
            for folder in [self.store.path(LEASE_DIR), *self._made]:
                try:
                    os.rmdir(folder)
                except OSError:
                    break  # another process's lease is there, the run wrote files, or it is gone

    def __enter__(self) -> DriverLease:
        return self.claim()

    def __exit__(self, *exc: object) -> None:
        self.release()
