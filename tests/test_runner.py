"""run_search end to end on tiny synthetic searches: exact resume, corrupt checkpoints, TensorBoard."""

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from distsearch.runner import Interrupted, run_search
from distsearch.storage import Store
from tests.conftest import store_files


def _final_state(store: Store) -> dict:
    _, state, _ = store.load_latest()
    return state["searcher"]["model"]


def _assert_same(a, b, where: str) -> None:
    """Nested dicts / lists of tensors and plain values, equal bitwise."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


@pytest.mark.parametrize(
    "order,stop_at,extra",
    [("first", 3, {}), ("second", 6, {}), ("first", 3, {"precision": "bf16", "channels_last": True})],
)
def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, tiny_config, order, stop_at, extra):
    """3 epochs (the lr schedule restored at the resume then drives later weight steps): the
    model, both optimisers and the schedule, and every epoch's record (the running sums of the
    interrupted epoch included) are what the uninterrupted search has, bitwise."""
    straight = Store(str(tmp_path / "straight"))
    r1 = run_search(tiny_config(straight.uri, epochs=3, **{"algorithm.order": order}, **extra), straight)

    over = {"algorithm.order": order, "storage.every_n_steps": 2}
    cfg = tiny_config(str(tmp_path / "resumed"), epochs=3, **over, **extra)
    resumed = Store(cfg.storage.uri)
    with pytest.raises(Interrupted):
        run_search(cfg, resumed, stop_after_steps=stop_at)  # mid-epoch (4 steps per epoch)
    assert resumed.list_checkpoints(), "a mid-epoch checkpoint exists"
    r2 = run_search(cfg, resumed)

    assert r1.genotype == r2.genotype and r1.steps == r2.steps
    a, b = straight.load_latest()[1]["searcher"], resumed.load_latest()[1]["searcher"]
    _assert_same(a["model"], b["model"], "model")
    for key in ("scheduler", "a_optimizer", "w_optimizer"):
        _assert_same(a[key], b[key], key)
    untimed = lambda h: [{k: v for k, v in r.items() if k != "time/epoch_s"} for r in h]  # noqa: E731
    assert untimed(r1.history) == untimed(r2.history)
    assert resumed.read_json("genotype.json") == r1.genotype.to_dict()


def test_each_checkpoint_is_written_once(tmp_path, tiny_config, monkeypatch):
    """every_n_steps dividing the epoch: the epoch-end checkpoint is not written twice under one
    name (a rewrite leaves the name uncommitted for a moment: with keep=1, no valid checkpoint)."""
    saved = []
    original = Store.save_checkpoint
    monkeypatch.setattr(
        Store, "save_checkpoint", lambda self, step, *a, **k: saved.append(step) or original(self, step, *a, **k)
    )
    cfg = tiny_config(str(tmp_path / "once"), **{"storage.every_n_steps": 2, "storage.keep": 1})
    run_search(cfg, Store(cfg.storage.uri))
    assert saved == [2, 4, 6, 8]  # 4 steps per epoch: step 2, epoch end 4, step 6, epoch end 8
    assert Store(cfg.storage.uri).list_checkpoints() == ["ckpt-0000000008"]


def test_resume_skips_a_corrupt_newest_checkpoint(tmp_path, tiny_config):
    straight = Store(str(tmp_path / "a"))
    run_search(tiny_config(straight.uri, epochs=3), straight)
    cfg = tiny_config(str(tmp_path / "b"), epochs=3)
    store = Store(cfg.storage.uri)
    with pytest.raises(Interrupted):
        run_search(cfg, store, stop_after_steps=10)  # epochs 1 and 2 checkpointed at steps 4, 8
    newest = store.path(f"checkpoints/{store.list_checkpoints()[-1]}/state.pt")
    data = store.fs.cat_file(newest)
    store.fs.pipe_file(newest, data[: len(data) - 7])  # truncated
    run_search(cfg, store)  # resumes from step 4 and redoes epoch 2
    _assert_same(_final_state(straight), _final_state(store), "model")


def test_resume_refuses_a_store_with_another_config(tmp_path, tiny_config):
    from distsearch.errors import UsageError

    store = Store(str(tmp_path / "x"))
    run_search(tiny_config(store.uri, epochs=1), store)
    with pytest.raises(UsageError, match="space.C: 2 -> 4"):
        run_search(tiny_config(store.uri, epochs=1, **{"space.C": 4}), store)
    with pytest.raises(UsageError, match="data.batch_size: 16 -> 8"):
        run_search(tiny_config(store.uri, epochs=1, **{"data.batch_size": 8}), store)
    # where the data lies and the evaluation batch may change (another machine, a moved folder)
    moved = {"data.root": str(tmp_path / "elsewhere"), "data.eval_batch_size": 32}
    assert run_search(tiny_config(store.uri, epochs=2, **moved), store).genotype is not None
    stored = store.read_json("config.json")  # the resumed run's config is the one on record
    assert stored["epochs"] == 2 and stored["data"]["eval_batch_size"] == 32
    # a deliberate change, allowed: it is on record too
    with pytest.raises(UsageError, match=r"optim.w_lr: 0.025 -> 0.01\); continue it as it ran"):
        run_search(tiny_config(store.uri, epochs=3, **moved, **{"optim.w_lr": 0.01}), store)
    run_search(tiny_config(store.uri, epochs=3, **moved, **{"optim.w_lr": 0.01}), store, allow_changes=True)
    assert store.read_json("config.json")["optim"]["w_lr"] == 0.01


def test_resume_reads_a_config_written_before_a_field_was_added(tmp_path, tiny_config):
    """config.json of an earlier version lacks a field added since (algorithm.robust_batch):
    at its default the run resumes; set to another value it is refused."""
    from distsearch.errors import UsageError

    store = Store(str(tmp_path / "x"))
    dsrna = {"algorithm.name": "dsrna", "algorithm.projections": 1}
    with pytest.raises(Interrupted):
        run_search(tiny_config(store.uri, epochs=2, **dsrna), store, stop_after_steps=6)
    old = store.read_json("config.json")
    del old["algorithm"]["robust_batch"]
    store.write_json("config.json", old)
    assert run_search(tiny_config(store.uri, epochs=2, **dsrna), store).genotype is not None
    with pytest.raises(UsageError, match="algorithm.robust_batch: 0 -> 4"):
        run_search(tiny_config(store.uri, epochs=3, **dsrna, **{"algorithm.robust_batch": 4}), store)


def test_resume_refuses_a_checkpoint_of_another_layout_and_writes_nothing(tmp_path, tiny_config):
    """A checkpoint whose supernet keys fit no layout (neither today's nor the per-edge one that
    tests/test_layout.py reads): one clear error, no new files."""
    from distsearch.errors import UsageError

    store = Store(str(tmp_path / "old"))
    cfg = tiny_config(store.uri, epochs=2)
    with pytest.raises(Interrupted):
        run_search(cfg, store, stop_after_steps=6)  # epoch 1 checkpointed at step 4
    name, state, meta = store.load_latest()
    model = state["searcher"]["model"]
    key = next(k for k in model if ".groups." in k)
    model[key.replace(".groups.", ".edges.")] = model.pop(key)
    store.save_checkpoint(meta["global_step"] + 1, state, meta)
    before = sorted(store.fs.find(store.path("")))
    with pytest.raises(UsageError, match="--resume: checkpoint ckpt-.* does not fit"):
        run_search(cfg, store)
    assert sorted(store.fs.find(store.path(""))) == before
    from distsearch.train import load_model  # certify / evaluate read it the same way

    with pytest.raises(UsageError, match="URI: checkpoint ckpt-.* does not fit"):
        load_model(store.uri)


def test_tensorboard_files_read_back(tmp_path, tiny_config):
    store = Store(str(tmp_path / "tb"))
    run_search(tiny_config(store.uri, epochs=2), store)
    acc = EventAccumulator(store.path("tb"), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in (
        "train/train_loss",
        "train/train_acc",
        "val/loss",
        "val/acc",
        "lr/weights",
        "lr/arch",
        "alpha/entropy_normal",
        "alpha/entropy_reduce",
        "step/val_loss",
    ):
        assert tag in tags["scalars"], tag
    assert [e.step for e in acc.Scalars("val/acc")] == [1, 2]
    for tag in ("alpha/normal", "alpha/reduce", "cells/normal", "cells/reduce"):
        assert tag in tags["images"], tag
        assert acc.Images(tag)[-1].width > 100
    assert any("genotype" in t for t in tags["tensors"])


def test_remote_store_mirrors_tensorboard(tiny_config):
    import uuid

    cfg = tiny_config(f"memory://tb-{uuid.uuid4().hex}/run", epochs=1)
    store = Store(cfg.storage.uri)
    run_search(cfg, store)
    files = store.fs.find(store.path("tb"))
    assert any("tfevents" in f for f in files)
    assert store.exists("genotype.json") and store.list_checkpoints()


@pytest.mark.parametrize(
    "algorithm,changed",
    [
        ("darts", {"optim.w_lr": 0.1, "optim.arch_lr": 0.02}),
        ("lease", {"optim.w_lr": 0.1, "algorithm.audience_lr": 0.05}),
    ],
)
def test_resume_with_mutated_hyperparameters_follows_the_new_config(tmp_path, tiny_config, algorithm, changed):
    """PBT restarts a trial from a checkpoint with mutated lrs: the new ones must take effect
    (the loaded optimiser state would otherwise bring the old ones back)."""
    base = {"algorithm.name": algorithm, "epochs": 3, "optim.w_lr": 0.05}
    cfg_old = tiny_config(str(tmp_path / "pbt"), **base)
    store = Store(cfg_old.storage.uri)
    with pytest.raises(Interrupted):
        run_search(cfg_old, store, stop_after_steps=5)  # epoch 1 checkpointed at step 4
    cfg_new = tiny_config(store.uri, **{**base, **changed})
    store.write_json("config.json", cfg_new.model_dump(mode="json"))  # as the Tune trainable does
    mutated = run_search(cfg_new, store, config_may_change=True)  # as the trainable does after a restore
    reference = run_search(tiny_config(str(tmp_path / "new"), **{**base, **changed}), Store(str(tmp_path / "new")))

    assert len(mutated.history) == len(reference.history) == 3
    for got, want in zip(mutated.history[1:], reference.history[1:], strict=True):
        for key in [k for k in want if k.startswith("lr/")]:
            assert got[key] == pytest.approx(want[key], rel=1e-12), key
    old = run_search(cfg_old, Store(str(tmp_path / "old")))
    assert mutated.history[1]["lr/weights"] != pytest.approx(old.history[1]["lr/weights"])


def test_bf16_and_channels_last_reach_the_convolutions(tmp_path, tiny_config):
    """precision: bf16 runs the step's convolutions in bf16; channels_last feeds them NHWC."""
    seen = []

    def hook(module, inputs, output):
        if isinstance(module, torch.nn.Conv2d) and module.training and torch.is_grad_enabled():
            x = inputs[0]
            seen.append((output.dtype, x.shape[1] == 1 or x.is_contiguous(memory_format=torch.channels_last)))

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        store = Store(str(tmp_path / "bf16"))
        result = run_search(tiny_config(store.uri, precision="bf16", channels_last=True, epochs=1), store)
    finally:
        handle.remove()
    assert seen and all(dtype == torch.bfloat16 for dtype, _ in seen)
    nhwc = sum(n for _, n in seen) / len(seen)
    assert nhwc > 0.8, nhwc  # a few ops (the concatenations before 1x1 preprocessing) return NCHW
    result.genotype.validate()
    assert all(torch.isfinite(torch.tensor(v)) for v in result.metrics.values())


def test_finite_difference_jacobian_refuses_bf16(tiny_config):
    from distsearch.errors import UsageError

    with pytest.raises(UsageError, match="jacobian_fd_step: finite differences need fp32"):
        tiny_config("memory://x", precision="bf16", algorithm={"name": "dsrna", "jacobian_fd_step": 1e-3})


@pytest.mark.parametrize(
    "algorithm",
    [
        {"name": "dsrna", "variant": "combined", "bound": "crown", "projections": 1},
        {"name": "lease", "attack_steps": 2},
        {"name": "darts", "order": "second"},
    ],
)
def test_every_algorithm_runs_under_bf16(tmp_path, tiny_config, algorithm):
    store = Store(str(tmp_path / "run"))
    result = run_search(tiny_config(store.uri, precision="bf16", epochs=1, algorithm=algorithm), store)
    result.genotype.validate()
    assert all(torch.isfinite(torch.tensor(v)) for v in result.metrics.values())


@pytest.mark.parametrize("name", ["darts", "lease", "dsrna"])
def test_the_hypergradient_switches_reach_the_searcher(tmp_path, tiny_config, name):
    from distsearch.runner import build_data, build_searcher, build_supernet

    over = {"algorithm.name": name, "algorithm.fd_r": 0.05, "algorithm.fd_replay": False}
    cfg = tiny_config(str(tmp_path / "x"), **over)
    data = build_data(cfg)
    searcher = build_searcher(cfg, build_supernet(cfg, data), data)
    assert searcher.fd_r == 0.05 and searcher.fd_replay is False


def test_resume_with_fewer_epochs_than_done_is_refused(tmp_path, tiny_config):
    """`search --out X --resume --set epochs=1` on a finished 2-epoch run: refused before anything
    is written (it exited 0 with config.json saying 1 epoch); with the same epochs it just finishes."""
    from distsearch.errors import UsageError

    store = Store(str(tmp_path / "x"))
    result = run_search(tiny_config(store.uri, epochs=2), store)
    before = store_files(store)
    with pytest.raises(
        UsageError, match=rf"^epochs: the run at {store.uri} has done 2 epochs; resume with epochs >= 2$"
    ):
        run_search(tiny_config(store.uri, epochs=1), store)
    assert store_files(store) == before
    again = run_search(tiny_config(store.uri, epochs=2), store)
    assert (again.genotype, again.epochs, again.metrics) == (result.genotype, 2, result.metrics)


def test_a_store_without_checkpoints_takes_a_new_config(tmp_path, tiny_config):
    """Killed before its first checkpoint (config.json only): nothing to continue, so a run with
    other values starts there; a run of the other kind is still refused."""
    from distsearch.config import TrainConfig
    from distsearch.config_file import parse_config
    from distsearch.errors import UsageError
    from distsearch.runner import check_kind

    store = Store(str(tmp_path / "x"))
    with pytest.raises(Interrupted):
        run_search(tiny_config(store.uri, epochs=1), store, stop_after_steps=1)
    assert store.exists("config.json") and not store.list_checkpoints()
    training = parse_config({"model": {"name": "mlp"}, "storage": {"uri": store.uri}}, TrainConfig)
    with pytest.raises(UsageError, match="holds a search, not this kind of run"):
        check_kind(store, training)
    assert run_search(tiny_config(store.uri, epochs=1, **{"space.C": 4}), store).epochs == 1
    assert store.read_json("config.json")["space"]["C"] == 4


class _Parts(torch.nn.Module):
    """arch_parameters() / weight_parameters() as given: empty or overlapping lists."""

    def __init__(self, arch: bool, shared: bool) -> None:
        super().__init__()
        self.a, self.w = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
        self._arch, self._shared = arch, shared

    def arch_parameters(self) -> list[torch.nn.Parameter]:
        return [self.a] if self._arch else []

    def weight_parameters(self) -> list[torch.nn.Parameter]:
        return [self.w, self.a] if self._shared else [self.w]


@pytest.mark.parametrize("parts,needle", [((False, False), "returns no α"), ((True, True), "shares parameters")])
def test_a_searcher_refuses_empty_or_shared_parameter_lists(parts, needle):
    from distsearch.search import SEARCHERS

    with pytest.raises(ValueError, match=f"DartsSearcher: model's arch_parameters.*_Parts {needle}"):
        SEARCHERS["darts"](_Parts(*parts), epochs=1)


@pytest.mark.parametrize("name", ["darts", "dsrna", "lease"])
@pytest.mark.parametrize("model", [lambda: torch.nn.Linear(4, 3), lambda: object()])
def test_a_searcher_refuses_a_model_without_architecture_parameters(name, model):
    """A plain network (or no module at all) is named in a TypeError, before any attribute of it is used."""
    from distsearch.search import SEARCHERS

    extra = {"in_channels": 1, "num_classes": 3} if name == "lease" else {}
    m = model()
    with pytest.raises(TypeError, match=r"model must be a search_spaces\.Supernet or an nn\.Module with") as e:
        SEARCHERS[name](m, epochs=1, **extra)
    assert type(m).__name__ in str(e.value) and SEARCHERS[name].__name__ in str(e.value)


def test_a_finished_run_taken_further_no_longer_says_it_is_finished(tmp_path, tiny_config):
    """Resumed with more epochs and stopped: result.json and genotype.json of the first end are gone
    (status, report and `train --genotype` read them); the run's end writes them again."""
    store = Store(str(tmp_path / "run"))
    run_search(tiny_config(store.uri, epochs=1), store)
    assert store.exists("result.json") and store.exists("genotype.json")
    longer = tiny_config(store.uri, epochs=2)
    with pytest.raises(Interrupted):
        run_search(longer, store, stop_after_steps=6)  # epoch 2 of 2 (4 steps an epoch)
    assert not store.exists("result.json") and not store.exists("genotype.json")
    run_search(longer, store)
    assert store.read_json("result.json")["epochs"] == 2 and store.exists("genotype.json")
    run_search(longer, store)  # finished already: its outputs stay
    assert store.read_json("result.json")["epochs"] == 2 and store.exists("genotype.json")
