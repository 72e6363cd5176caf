import hashlib
import io
import json
import os
import pickle

import numpy as np
import pytest
import torch

from distsearch.errors import UsageError
from distsearch.storage import Store


@pytest.fixture(params=["memory", "local", "gs"])
def store(request, tmp_path):
    """A fresh store in memory, in a local folder, and on gs:// (tests.conftest's emulator)."""
    if request.param == "memory":
        import uuid

        return Store(f"memory://test-{uuid.uuid4().hex}/run")
    if request.param == "gs":
        from tests.conftest import gcs_store

        return gcs_store(request.getfixturevalue("gcs_endpoint"))
    return Store(str(tmp_path / "run"))


def test_checkpoints_commit_list_latest_and_prune(store):
    for step in (5, 10, 15, 20):
        store.save_checkpoint(step, {"w": torch.full((3,), float(step))}, {"step": step}, keep=3)
    assert store.list_checkpoints() == ["ckpt-0000000010", "ckpt-0000000015", "ckpt-0000000020"]
    name, state, meta = store.load_latest()
    assert name == "ckpt-0000000020" and meta == {"step": 20} and torch.equal(state["w"], torch.full((3,), 20.0))
    manifest = store.read_json("checkpoints/ckpt-0000000020/MANIFEST.json")
    assert set(manifest["files"]) == {"state.pt", "meta.json"} and len(manifest["files"]["state.pt"]["sha256"]) == 64
    for fname, info in manifest["files"].items():  # the manifest describes the files as stored
        data = store.read_bytes(f"checkpoints/ckpt-0000000020/{fname}")
        assert info == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    store.fs.invalidate_cache()
    left = {p.split("/")[-2] for p in store.fs.find(store.path("checkpoints"))}  # nothing of a pruned one
    assert left == {"ckpt-0000000010", "ckpt-0000000015", "ckpt-0000000020"}


def test_prune_removes_folders_a_killed_write_left_uncommitted(store):
    """A checkpoint whose write was killed before its manifest (or a prune killed midway) is never
    listed; the next prune removes it when it lies below the checkpoint just written."""
    store.save_checkpoint(5, {"w": torch.ones(3)}, {"step": 5}, keep=2)
    store.write_bytes("checkpoints/ckpt-0000000007/state.pt", b"half a state")  # killed at step 7
    store.write_bytes("checkpoints/ckpt-0000000030/state.pt", b"from an earlier attempt")  # past: kept
    assert store.list_checkpoints() == ["ckpt-0000000005"]
    store.save_checkpoint(10, {"w": torch.ones(3)}, {"step": 10}, keep=2)
    store.fs.invalidate_cache()
    left = {p.split("/")[-2] for p in store.fs.find(store.path("checkpoints"))}
    assert left == {"ckpt-0000000005", "ckpt-0000000010", "ckpt-0000000030"}
    assert store.list_checkpoints() == ["ckpt-0000000005", "ckpt-0000000010"]


def test_folders_not_named_as_checkpoints_are_left_alone(store):
    """A user's ckpt-old or ckpt-backup-3 under checkpoints/ is neither listed nor pruned."""
    for name in ("ckpt-old", "ckpt-backup-3"):
        store.write_bytes(f"checkpoints/{name}/state.pt", b"mine")
    for step in (5, 10):
        store.save_checkpoint(step, {"w": torch.ones(3)}, {"step": step}, keep=1)
    assert store.list_checkpoints() == ["ckpt-0000000010"] and store.load_latest()[0] == "ckpt-0000000010"
    assert store.exists("checkpoints/ckpt-old/state.pt") and store.exists("checkpoints/ckpt-backup-3/state.pt")


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "same_size_edit"])
@pytest.mark.parametrize("file", ["state.pt", "meta.json"])
def test_corrupt_or_truncated_checkpoint_falls_back_to_previous(store, file, damage, caplog):
    """Every file of a checkpoint is verified: a meta.json edited to the same size (its step, its
    genotype) counts as corrupt like a damaged state.pt."""
    store.save_checkpoint(1, {"w": torch.ones(100)}, {"step": 1})
    store.save_checkpoint(2, {"w": torch.ones(100) * 2}, {"step": 2})
    path = store.path(f"checkpoints/ckpt-0000000002/{file}")
    data = store.fs.cat_file(path)
    if damage == "flip":
        data = data[:-10] + bytes([data[-10] ^ 0xFF]) + data[-9:]
        store.fs.pipe_file(path, data)
    elif damage == "truncate":
        store.fs.pipe_file(path, data[: len(data) // 2])
    elif damage == "same_size_edit":  # meta.json {"step": 2} -> {"step": 9}; a byte of state.pt's tensor
        i = data.rindex(b"2") if file == "meta.json" else len(data) // 2
        store.fs.pipe_file(path, data[:i] + (b"9" if file == "meta.json" else bytes([data[i] ^ 1])) + data[i + 1 :])
    else:
        store.fs.rm(path)
    name, state, meta = store.load_latest()
    assert name == "ckpt-0000000001" and torch.equal(state["w"], torch.ones(100)) and meta["step"] == 1
    assert store.latest() == "ckpt-0000000001"
    assert "ckpt-0000000002" in caplog.text


def _string_size() -> dict:
    ok = {"size": 1, "sha256": "x"}
    return {"files": {"state.pt": {"size": "1", "sha256": "x"}, "meta.json": ok}}


@pytest.mark.parametrize(
    "manifest", [{}, [], {"files": {"meta.json": {"size": 1, "sha256": "x"}}}, {"files": 3}, _string_size()]
)
def test_malformed_manifest_is_skipped_like_a_corrupt_checkpoint(store, manifest, caplog):
    store.save_checkpoint(1, {"w": torch.ones(2)}, {"step": 1})
    store.save_checkpoint(2, {"w": torch.ones(2) * 2}, {"step": 2})
    store.write_json("checkpoints/ckpt-0000000002/MANIFEST.json", manifest)
    assert store.load_latest()[0] == store.latest() == "ckpt-0000000001"
    assert "malformed manifest" in caplog.text


def test_prune_keeps_the_checkpoint_just_written_past_newer_corrupt_ones(store):
    """A run restarted from scratch because every checkpoint was corrupt: the stale ones carry
    higher steps, and must not count toward `keep` (they would evict each new checkpoint)."""
    for step in (20, 30):
        store.save_checkpoint(step, {"w": torch.ones(2)}, {"step": step})
        store.write_bytes(f"checkpoints/ckpt-{step:010d}/state.pt", b"garbage")
    assert store.latest() is None
    for step in (3, 6, 9):
        store.save_checkpoint(step, {"w": torch.full((2,), float(step))}, {"step": step}, keep=2)
    assert store.latest() == "ckpt-0000000009"
    assert store.list_checkpoints() == ["ckpt-0000000006", "ckpt-0000000009", "ckpt-0000000020", "ckpt-0000000030"]


def test_rewriting_a_checkpoint_uncommits_it_first(store):
    store.save_checkpoint(4, {"w": torch.ones(2)}, {"step": 4})
    writes = []
    original = store.write_bytes

    def spy(rel, data):  # what is committed while each file of the rewrite lands
        writes.append((rel.rsplit("/", 1)[-1], store.exists("checkpoints/ckpt-0000000004/MANIFEST.json")))
        original(rel, data)

    store.write_bytes = spy
    store.save_checkpoint(4, {"w": torch.zeros(2)}, {"step": 4, "again": True})
    assert writes[:2] == [("state.pt", False), ("meta.json", False)]
    name, state, meta = store.load_latest()
    assert torch.equal(state["w"], torch.zeros(2)) and meta["again"]


def test_uncommitted_checkpoint_is_invisible(store):
    store.save_checkpoint(1, {"w": torch.ones(1)}, {})
    store.write_bytes("checkpoints/ckpt-0000000002/state.pt", b"partial")  # crashed before its manifest
    assert store.list_checkpoints() == ["ckpt-0000000001"] and store.latest() == "ckpt-0000000001"


def test_never_unpickles_arbitrary_objects(store):
    """A checkpoint whose manifest verifies but whose state.pt holds a pickled call: refused by
    torch.load(weights_only=True), the call never runs, load_latest falls back."""
    store.save_checkpoint(1, {"w": torch.ones(1)}, {})
    buf = io.BytesIO()
    torch.save({"w": _Marker()}, buf, pickle_protocol=pickle.DEFAULT_PROTOCOL)
    data = buf.getvalue()
    store.write_bytes("checkpoints/ckpt-0000000002/state.pt", data)
    store.write_bytes("checkpoints/ckpt-0000000002/meta.json", b"{}")
    store.write_json(
        "checkpoints/ckpt-0000000002/MANIFEST.json",
        {
            "step": 2,
            "files": {
                "state.pt": {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)},
                "meta.json": {"sha256": hashlib.sha256(b"{}").hexdigest(), "size": 2},
            },
        },
    )
    with pytest.raises(pickle.UnpicklingError):
        store.load_checkpoint("ckpt-0000000002")
    assert store.load_latest()[0] == "ckpt-0000000001"
    assert not _ran


def test_json_and_atomic_local_writes_leave_no_temp_files(tmp_path):
    s = Store(f"file://{tmp_path}/x")
    s.write_json("a/b.json", {"k": [1, 2]})
    assert s.read_json("a/b.json") == {"k": [1, 2]}
    assert os.listdir(tmp_path / "x" / "a") == ["b.json"]
    assert json.loads((tmp_path / "x" / "a" / "b.json").read_text()) == {"k": [1, 2]}


def test_unknown_protocol_is_a_usage_error():
    with pytest.raises(UsageError, match="storage.uri"):
        Store("nosuchproto://bucket/x")


def _genotype():
    from search_spaces import Genotype

    edges = (("skip_connect", 0), ("sep_conv_3x3", 1))
    return Genotype(edges, (2,), edges, (2,))


@pytest.mark.parametrize(
    "bad,path,kind",
    [
        (lambda: {"extra": {"alphas": [torch.ones(1), np.ones(3)]}}, "['extra']['alphas'][1]", "numpy.ndarray"),
        (lambda: {"extra": {"lr": np.float32(0.1)}}, "['extra']['lr']", "numpy.float32"),
        (lambda: {"genotype": _genotype()}, "['genotype']", "search_spaces.genotype.Genotype"),
    ],
)
def test_save_checkpoint_refuses_what_weights_only_cannot_read_back_and_writes_nothing(store, bad, path, kind):
    from tests.conftest import store_files

    store.save_checkpoint(1, {"w": torch.ones(2)}, {"step": 1})
    before = store_files(store)
    for step in (1, 2):  # neither a rewrite (which would uncommit ckpt 1 first) nor a new one
        with pytest.raises(TypeError) as e:
            store.save_checkpoint(step, {"w": torch.zeros(2), **bad()}, {"step": step})
        msg = str(e.value)
        assert f"state{path} is a {kind}" in msg and "weights_only=True" in msg
        assert "tensors" in msg and "nothing was written" in msg and "Please use" not in msg
    assert store_files(store) == before
    assert store.latest() == "ckpt-0000000001" and torch.equal(store.load_latest()[1]["w"], torch.ones(2))


def test_a_searchers_state_with_every_plain_type_round_trips(store):
    from tests.conftest import tiny_searcher

    searcher, (train, val) = tiny_searcher()
    searcher.step(train, val)
    state = searcher.state_dict()
    state["extra"] = {"genotype": searcher.genotype().to_dict(), "t": (1, 2.5, None, "s", b"b", 1j), "s": {3}}
    store.save_checkpoint(3, state, {"step": 3})
    _, loaded, _ = store.load_latest()
    assert loaded["extra"] == state["extra"] and loaded["model"].keys() == state["model"].keys()


_ran = []


def _side_effect() -> None:
    _ran.append(True)


class _Marker:
    def __reduce__(self):
        return (_side_effect, ())


@pytest.mark.parametrize("bad", [lambda: np.ones(3), lambda: _genotype(), lambda: _Marker()])
def test_a_stored_checkpoint_weights_only_refuses_is_skipped_like_a_corrupt_one(store, bad, monkeypatch, caplog):
    """Written before save_checkpoint checked states (or by another tool): its manifest verifies,
    but weights_only refuses it. load_latest and latest skip it, nothing of it is unpickled."""
    import pickle

    from distsearch import storage

    store.save_checkpoint(1, {"w": torch.ones(2)}, {"step": 1})
    monkeypatch.setattr(storage, "check_loadable", lambda *a: None, raising=False)  # as older versions wrote
    store.save_checkpoint(2, {"w": torch.zeros(2), "extra": bad()}, {"step": 2})
    monkeypatch.undo()
    assert store.list_checkpoints() == ["ckpt-0000000001", "ckpt-0000000002"]
    name, state, meta = store.load_latest()
    assert name == "ckpt-0000000001" and meta == {"step": 1} and torch.equal(state["w"], torch.ones(2))
    assert store.latest() == "ckpt-0000000001"
    assert "ckpt-0000000002: state.pt cannot be read with torch.load(weights_only=True)" in caplog.text
    assert "Unsupported global" in caplog.text
    with pytest.raises(storage.UnloadableCheckpoint) as e:  # named: a corrupt one, and torch's error
        store.load_checkpoint("ckpt-0000000002")
    assert isinstance(e.value, storage.CorruptCheckpoint) and isinstance(e.value, pickle.UnpicklingError)
    assert not _ran


def test_a_damaged_json_file_is_one_error_naming_it(tmp_path) -> None:
    store = Store(str(tmp_path / "run"))
    store.write_json("data.json", {"train": [1]})
    (tmp_path / "run" / "data.json").write_text('{"train": [1')  # truncated
    with pytest.raises(UsageError, match=r"run/data.json is not valid JSON .*the store is damaged"):
        store.read_json("data.json", None)
    keys = {"train": list, "classes": int, "test": list}
    for damaged, what in [
        ({"train": [1]}, "lacks 'classes', 'test'"),
        ([1], "is not a JSON object"),
        ({"train": 5, "classes": 3, "test": [1]}, "has train=5 of the wrong type"),
    ]:
        store.write_json("data.json", damaged)
        with pytest.raises(UsageError, match=rf"run/data.json {what}; the store is damaged"):
            store.read_json("data.json", None, keys)
