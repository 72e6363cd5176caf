"""One driver per experiment (distsearch/driver_lease.py): claims, liveness, heartbeat, races."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from distsearch.driver_lease import LEASE_DIR, DriverLease, is_live, leases, live_drivers
from distsearch.errors import UsageError
from distsearch.storage import Store


@pytest.fixture(params=["local", "memory"])
def store(request, tmp_path):
    if request.param == "local":
        yield Store(str(tmp_path / "exp"))
        return
    uri = f"memory://lease-{time.time_ns()}"
    yield Store(uri)
    if Store(uri).exists():
        Store(uri).fs.rm(Store(uri).root, recursive=True)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _foreign(run: Store, **fields) -> None:
    """A lease written by another driver."""
    lease = {"token": "other", "host": "elsewhere", "pid": 1, "command": "run", "started": time.time()}
    lease.update({"beat": time.time(), **fields})
    run.write_json(f"{LEASE_DIR}/other.json", lease)


def test_claim_holds_until_released(store):
    first = DriverLease(store, "run").claim()
    assert [lease["pid"] for lease in live_drivers(store)] == [os.getpid()]
    with pytest.raises(UsageError, match=rf"in use by another process \(`run` pid {os.getpid()}"):
        DriverLease(store, "resume").claim()
    assert len(leases(store)) == 1  # the refused claim removed its own file
    first.release()
    assert leases(store) == []
    with DriverLease(store, "resume"):  # free again
        assert len(live_drivers(store)) == 1
    assert leases(store) == []
    if store.is_local:
        assert not os.path.exists(store.path(LEASE_DIR))  # no empty folder left in the run's store


def test_a_live_driver_on_another_host_is_respected_until_its_heartbeat_is_stale(store):
    _foreign(store)
    with pytest.raises(UsageError, match="pid 1 on elsewhere"):
        DriverLease(store, "resume").claim()
    _foreign(store, beat=time.time() - 61)  # no heartbeat for over STALE_S: that driver is gone
    with DriverLease(store, "resume"):
        assert [lease["token"] for _, lease in leases(store)] != ["other"]  # and its lease was deleted
        assert len(leases(store)) == 1


def test_a_killed_driver_on_this_host_stops_counting_at_once(store):
    import socket

    _foreign(store, host=socket.gethostname(), pid=_dead_pid())  # fresh heartbeat, dead process
    assert live_drivers(store) == []
    with DriverLease(store, "resume"):
        pass
    _foreign(store, host=socket.gethostname(), pid=os.getppid())  # a live process here
    assert len(live_drivers(store)) == 1


def test_is_live_needs_a_fresh_beat():
    now = time.time()
    lease = {"host": "elsewhere", "pid": 1, "beat": now - 30}
    assert is_live(lease, now) and not is_live(lease, now, stale_s=20)


def test_heartbeat_refreshes_the_lease_and_stops_on_release(store):
    lease = DriverLease(store, "run", beat_s=0.05).claim()
    beat0 = leases(store)[0][1]["beat"]
    time.sleep(0.4)
    beat1 = leases(store)[0][1]["beat"]
    lease.release()
    assert beat1 > beat0 + 0.1
    time.sleep(0.2)
    assert leases(store) == []  # no beat after release wrote the file again


def test_racing_claims_never_both_win(tmp_path):
    """Many drivers claiming at once: at most one holds the experiment each round."""
    for round_ in range(15):
        store = Store(str(tmp_path / f"race{round_}"))
        barrier, won, lost = threading.Barrier(4), [], []

        def claim(store=store, barrier=barrier, won=won, lost=lost):
            lease = DriverLease(store, "run")
            barrier.wait()
            try:
                won.append(lease.claim())
            except UsageError:
                lost.append(lease)

        threads = [threading.Thread(target=claim) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) <= 1 and len(won) + len(lost) == 4
        assert len(leases(store)) == len(won)  # losers leave nothing behind
        for lease in won:
            lease.release()


def test_release_removes_only_the_folders_the_claim_made(tmp_path):
    fresh = Store(str(tmp_path / "new" / "run"))
    DriverLease(fresh, "search").claim().release()
    assert not (tmp_path / "new").exists()  # a refused run leaves no empty folder, nor its new parents
    (tmp_path / "old").mkdir()
    DriverLease(Store(str(tmp_path / "old")), "search").claim().release()
    assert (tmp_path / "old").is_dir()
    lease = DriverLease(fresh, "search").claim()
    (tmp_path / "new" / "run" / "config.json").write_text("{}")  # the run wrote its files
    lease.release()
    assert sorted(p.name for p in (tmp_path / "new" / "run").iterdir()) == ["config.json"]


def test_a_suspended_process_here_holds_its_lease_and_a_reused_pid_does_not(tmp_path):
    """Ctrl-Z: the heartbeat stops but the process exists, so it still holds the store. A lease
    whose pid now belongs to another process (other start time) holds nothing."""
    import signal
    import socket

    from distsearch.driver_lease import _start_time

    store = Store(str(tmp_path / "run"))
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        p.send_signal(signal.SIGSTOP)
        old = time.time() - 3600  # no heartbeat for an hour
        _foreign(store, host=socket.gethostname(), pid=p.pid, pid_start=_start_time(p.pid), beat=old)
        with pytest.raises(UsageError, match=f"kill {p.pid} on {socket.gethostname()}"):
            DriverLease(store, "search").claim()
        _foreign(store, host=socket.gethostname(), pid=p.pid, pid_start="1", beat=time.time())
        assert live_drivers(store) == []
    finally:
        p.kill()
        p.wait()


def test_a_lease_copied_with_its_folder_does_not_hold_the_copy(tmp_path):
    import shutil

    original = Store(str(tmp_path / "a"))
    with DriverLease(original, "search"):
        shutil.copytree(tmp_path / "a", tmp_path / "b")
        copy = Store(str(tmp_path / "b"))
        assert len(leases(copy)) == 1 and live_drivers(copy) == [] and len(live_drivers(original)) == 1
        with DriverLease(copy, "search"):  # and the copied lease file is cleared
            assert [lease["store"] for _, lease in leases(copy)] == [f"file://{copy.root}"]


def test_a_live_lease_in_a_blocker_refuses_the_claim(tmp_path):
    """A search on a trial's store while the experiment's driver runs, and the reverse."""
    root, trial = Store(str(tmp_path / "exp")), Store(str(tmp_path / "exp" / "t1" / "search"))
    with DriverLease(root, "run"):
        with pytest.raises(UsageError, match=rf"in use by another process \(it holds {root.uri}\) \(`run` pid"):
            DriverLease(trial, "search", blockers=(root,)).claim()
    assert leases(trial) == []
    with DriverLease(trial, "search", blockers=(root,)):
        with pytest.raises(UsageError, match="`search` pid"):
            DriverLease(root, "resume", blockers=(trial,)).claim()


def test_a_store_reached_through_a_symlink_is_the_same_store(tmp_path):
    store = Store(str(tmp_path / "run"))
    with DriverLease(store, "search"):
        (tmp_path / "link").symlink_to(tmp_path / "run")
        with pytest.raises(UsageError, match="in use by another process"):
            DriverLease(Store(str(tmp_path / "link")), "search").claim()


def test_paths_are_not_compared_across_hosts(tmp_path):
    """A shared disk may be mounted at another path there: a live lease from another host holds."""
    store = Store(str(tmp_path / "run"))
    _foreign(store, **{"store": "file:///mnt/elsewhere/run"})
    assert len(live_drivers(store)) == 1


def test_leases_of_another_shape_are_ignored(tmp_path) -> None:
    """Valid JSON that is not a lease (edited by hand, another tool) is skipped, not a traceback."""
    store = Store(str(tmp_path / "run"))
    for i, text in enumerate(["[]", "null", '{"host": "vm", "pid": "abc"}', '{"host": "vm", "pid": 1}']):
        (tmp_path / "run" / LEASE_DIR).mkdir(parents=True, exist_ok=True)
        (tmp_path / "run" / LEASE_DIR / f"odd{i}.json").write_text(text)
    assert leases(store) == [] and live_drivers(store) == []
    with DriverLease(store, "search"):
        assert [lease["command"] for _, lease in leases(store)] == ["search"]


def test_a_claim_interrupted_midway_leaves_no_lease(store, monkeypatch):
    """Ctrl-C or SIGTERM between writing the lease and holding it (__exit__ never runs): the claim
    removes its own lease, which other hosts would otherwise honour for STALE_S."""
    import distsearch.driver_lease as driver_lease

    def interrupted(_store):
        raise KeyboardInterrupt

    monkeypatch.setattr(driver_lease, "leases", interrupted)
    with pytest.raises(KeyboardInterrupt):
        with DriverLease(store, "search"):
            pytest.fail("held")
    monkeypatch.undo()
    assert leases(store) == []
