"""train / evaluate / attack / certify / transfer from the command line, on tiny synthetic
data: a genotype's network is trained, then attacked, evaluated and certified."""

import json

import pytest
import torch
import yaml

from distsearch.cli import main
from distsearch.config import TrainConfig
from distsearch.config_file import parse_config
from distsearch.runner import Interrupted
from distsearch.storage import Store
from distsearch.train import run_training

DATA = [
    "--set",
    "data.name=synthetic",
    "--set",
    "data.synthetic.n=192",
    "--set",
    "data.synthetic.image_size=8",
    "--set",
    "data.batch_size=16",
    "--set",
    "threads=1",
    "--set",
    "monitor.progress=false",
    "--set",
    "eval.n=16",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("train")
    out, genotype = folder / "run", folder / "genotype.json"
    genotype.write_text(
        json.dumps(
            {
                "normal": [["sep_conv_3x3", 0], ["skip_connect", 1]],
                "normal_concat": [2],
                "reduce": [["max_pool_3x3", 0], ["avg_pool_3x3", 1]],
                "reduce_concat": [2],
            }
        )
    )
    argv = [
        "train",
        "--genotype",
        str(genotype),
        "--strategy",
        "fgsm_rs",
        "--eps",
        "0.1",
        "--epochs",
        "2",
        "--out",
        str(out),
        "--set",
        "model.C=4",
        "--set",
        "model.layers=3",
        *DATA,
    ]
    assert main(argv) == 0
    return out


def test_train_writes_a_resumable_run_with_robust_metrics(trained):
    result = json.loads((trained / "result.json").read_text())
    assert result["epochs"] == 2 and "test/robust_acc_pgd20" in result["metrics"]
    assert len(Store(str(trained)).list_checkpoints()) == 2


def test_evaluate_attack_certify_write_tables_and_pictures(trained, tmp_path, capsys):
    assert (
        main(
            [
                "evaluate",
                str(trained),
                "--n",
                "16",
                "--attacks",
                "fgsm",
                "pgd-20",
                "apgd-dlr",
                "--eps-linf",
                "0.05",
                "0.1",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "| pgd-20 | linf |" in out and "| apgd-dlr | linf |" in out and "| worst | linf |" in out
    assert {p.name for p in (trained / "eval").iterdir()} == {"robustness.csv", "robustness.md", "robustness.png"}
    assert main(["attack", str(trained), "--attack", "pgd", "--eps", "0.1", "--n", "8", "--out", str(tmp_path)]) == 0
    saved = torch.load(tmp_path / "adversarial.pt", weights_only=True)
    assert (saved["x_adv"] - saved["x"]).abs().max() <= 0.1 + 1e-6
    assert (tmp_path / "before_after.png").stat().st_size > 0
    argv = ["attack", str(trained), "--attack", "apgd", "--eps", "0.5", "--norm", "l2", "--steps", "10", "--n", "8"]
    assert main([*argv, "--out", str(tmp_path / "apgd")]) == 0
    saved = torch.load(tmp_path / "apgd" / "adversarial.pt", weights_only=True)
    assert float((saved["x_adv"] - saved["x"]).flatten(1).norm(dim=1).max()) <= 0.5 + 1e-5
    assert (
        main(
            [
                "attack",
                str(trained),
                "--attack",
                "fgm",  # L2 without --norm
                "--eps",
                "0.5",
                "--n",
                "8",
                "--out",
                str(tmp_path / "fgm"),
            ]
        )
        == 0
    )
    saved = torch.load(tmp_path / "fgm" / "adversarial.pt", weights_only=True)
    assert float((saved["x_adv"] - saved["x"]).flatten(1).norm(dim=1).max()) <= 0.5 + 1e-5
    assert (
        main(["certify", str(trained), "--eps", "0.001", "0.01", "--n", "8", "--method", "ibp", "--device", "cpu"]) == 0
    )
    assert (trained / "certify" / "certified.png").exists()
    single = (trained / "certify" / "certified.csv").read_text()
    argv = ["certify", str(trained), "--eps", "0.001", "0.01", "--n", "8", "--method", "ibp", "--float64"]
    assert main([*argv, "--out", str(tmp_path / "f64")]) == 0
    double = (tmp_path / "f64" / "certified.csv").read_text()
    assert double.splitlines()[0] == single.splitlines()[0] and len(double.splitlines()) == 3
    capsys.readouterr()
    assert (
        main(["certify", str(trained), "--eps", "100", "--n", "8", "--method", "ibp", "--out", str(tmp_path / "c")])
        == 0
    )
    assert "note: nothing certified at any eps (mean certified radius " in capsys.readouterr().err  # not 0 % silently


@pytest.mark.parametrize(
    "attack,extra", [("apgd-t", ["--steps", "5"]), ("fab-t", ["--steps", "5"]), ("square", ["--queries", "30"])]
)
@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.5)])
def test_attack_runs_apgd_t_fab_t_and_square(trained, tmp_path, attack, extra, norm, eps):
    argv = ["attack", str(trained), "--attack", attack, "--norm", norm, "--eps", str(eps), "--n", "8", *extra]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    saved = torch.load(tmp_path / "adversarial.pt", weights_only=True)
    delta = (saved["x_adv"] - saved["x"]).flatten(1)
    assert float(delta.abs().max() if norm == "linf" else delta.norm(dim=1).max()) <= eps + 1e-5


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["train", "--model", "nonet", "--epochs", "1"], "model.name"),
        (["train", "--model", "mlp", "--set", "model.kwargs.bogus=1"], "model.kwargs: bad option for 'mlp'"),
        (["train", "--model", "small_cnn", "--strategy", "magic"], "strategy"),
        (["train", "--model", "small_cnn", "--strategy", "pgd", "--set", "strategy.kwargs={{steps: 0}}"], "steps"),
        (["train", "--model", "small_cnn", "--eps", "-1"], "--eps"),
        (["train", "--model", "small_cnn", "--eps", "inf"], "--eps"),
        (["train", "--model", "small_cnn", "--strategy", "pgd", "--set", "strategy.eps=.nan"], "strategy.eps"),
        (["certify", "{run}", "--eps", "nan"], "--eps"),
        (["evaluate", "{run}", "--eps-linf", "inf"], "--eps-linf"),
        (["evaluate", "{tmp}/nothing"], "no run"),
        (["evaluate", "{run}", "--attacks", "magic"], "attacks"),
        (["derive", "{run}"], "not a search"),
        (["attack", "{run}", "--attack", "cw", "--norm", "linf"], "L2 only"),
        (["attack", "{run}", "--attack", "square", "--queries", "0"], "--queries: must be from 1 to 1000000, got 0"),
        (["attack", "{run}", "--steps", "1000000000"], "--steps: must be from 1 to 100000"),
        (["attack", "{run}", "--n", "0"], "--n: must be from 1"),
        (["certify", "{run}", "--n", "-5"], "--n: must be from 1"),
        (["evaluate", "{run}", "--n", "two"], "--n: expected a whole number"),
        # cw asked for at L-inf budgets only: not a table of the clean row without a word
        (["evaluate", "{run}", "--attacks", "fgsm", "cw"], "--attacks: cw runs at L2 budgets only"),
        (["attack", "{run}", "--seed", "-1"], "--seed"),
        (["evaluate", "{run}", "--threads", "0"], "--threads"),
        *([] if torch.cuda.is_available() else [(["certify", "{run}", "--device", "cuda"], "no GPU is visible")]),
        # an eps standard training would never use
        (["train", "--model", "small_cnn", "--eps", "0.3"], "pass an adversarial --strategy"),
        (["train", "--model", "small_cnn", "--set", "strategy.eps=0.3"], "strategy.eps"),
        (
            ["train", "--model", "small_cnn", "--config", "{tmp}/pgd.yaml", "--strategy", "standard", "--eps", "0.3"],
            "--eps",
        ),
    ],
)
def test_bad_robust_arguments_exit_2(trained, tmp_path, capsys, argv, needle):
    (tmp_path / "pgd.yaml").write_text("strategy: {strategy: pgd}\n")
    argv = [a.format(tmp=tmp_path, run=trained) for a in argv]
    if argv[0] == "train":
        argv += ["--out", str(tmp_path / "o"), *DATA]
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_free_training_says_what_its_epochs_cost(tmp_path, capsys):
    """FreeAT's epoch replays each batch m times; Shafahi et al. divide the epochs by m."""
    argv = ["train", "--model", "mlp", "--strategy", "free", "--epochs", "3", "--out", str(tmp_path / "f"), *DATA]
    assert main([*argv, "--set", "strategy.kwargs={replays: 2}", "--set", "model.kwargs={hidden: [8]}"]) == 0
    err = capsys.readouterr().err
    assert "free replays each batch 2 times, so each of the 3 epochs costs 2 standard ones" in err
    assert "(e.g. --epochs 2 for 3)" in err


@pytest.mark.parametrize("strategy", ["free", "pgd"])
def test_training_resume_is_exact(tmp_path, strategy):
    raw = {
        "seed": 0,
        "epochs": 2,
        "device": "cpu",
        "threads": 1,
        "model": {"name": "small_cnn"},
        "strategy": {"strategy": strategy, "eps": 0.1, "kwargs": {"replays": 2} if strategy == "free" else {}},
        "data": {"name": "synthetic", "batch_size": 16, "synthetic": {"n": 160, "image_size": 8}},
        "eval": {"n": 8, "steps": 2},
        "monitor": {"progress": False},
    }
    a = parse_config({**raw, "storage": {"uri": str(tmp_path / "a")}}, TrainConfig)
    b = parse_config({**raw, "storage": {"uri": str(tmp_path / "b"), "every_n_steps": 3}}, TrainConfig)
    ra = run_training(a, Store(a.storage.uri))
    with pytest.raises(Interrupted):
        run_training(b, Store(b.storage.uri), stop_after_steps=5)  # mid-epoch 2 (4 steps per epoch)
    rb = run_training(b, Store(b.storage.uri))
    assert ra["test/loss"] == rb["test/loss"]
    sa, sb = (Store(c.storage.uri).load_latest()[1] for c in (a, b))
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), k


def test_transfer_command(tmp_path, capsys):
    cfg = {
        "seed": 0,
        "epochs": 1,
        "threads": 1,
        "data": {"name": "digits", "batch_size": 32},
        "lr": 0.1,
        "models": [
            {"label": "a", "name": "mlp", "half": 0, "kwargs": {"hidden": [32]}},
            {"label": "b", "name": "mlp", "half": 1, "kwargs": {"hidden": [32]}, "seed": 1},
        ],
        "attack": {"name": "fgsm", "kwargs": {"eps": 0.2}},
        "n": 64,
        "units": {"model": "a", "layer": "first_layer.1", "k": 4},
    }
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["transfer", "--config", str(path), "--out", str(tmp_path / "out")]) == 0
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"transfer.csv", "transfer.md", "transfer.png", "units_a_direction.png"} <= names
    assert "noise(a)" in capsys.readouterr().out
    assert len(list((tmp_path / "out" / "tb").glob("events.out.tfevents.*"))) == 1
    assert main(["transfer", "--config", str(path), "--out", str(tmp_path / "out")]) == 0  # a rerun replaces
    assert "note: replacing the transfer results" in capsys.readouterr().err
    assert len(list((tmp_path / "out" / "tb").glob("events.out.tfevents.*"))) == 1  # TensorBoard shows one run
    for bad, needle in (("units.layer=nope", "units.layer"), ("units.k=65", "units.k")):  # before any training
        out = tmp_path / "bad"
        assert main(["transfer", "--config", str(path), "--out", str(out), "--set", bad]) == 2
        assert needle in capsys.readouterr().err and not out.exists()


def test_robust_accuracy_defaults_to_the_training_budget():
    """eval.eps / eval.norm not given: the strategy's (the budget the network is trained for)."""
    from distsearch.config import SearchConfig

    def train_eval(strategy: dict, **ev) -> tuple[float, str]:
        cfg = parse_config({"model": {"name": "mlp"}, "strategy": strategy, "eval": ev}, TrainConfig)
        return cfg.eval.eps, cfg.eval.norm

    assert train_eval({"strategy": "pgd", "eps": 0.3}) == (0.3, "linf")
    assert train_eval({"strategy": "pgd", "eps": 0.3, "kwargs": {"norm": "l2"}}) == (0.3, "l2")
    assert train_eval({"strategy": "fgm"}) == (1.0, "l2")  # FGM's default budget, L2
    assert train_eval({"strategy": "trades"}) == pytest.approx((8 / 255, "linf"))
    assert train_eval({"strategy": "pgd", "eps": 0.3}, eps=0.2) == (0.2, "linf")  # given: kept
    assert train_eval({"strategy": "fgm"}, norm="linf", eps=0.05) == (0.05, "linf")
    assert train_eval({"strategy": "standard"}) == (0.1, "linf")  # no training budget: the default
    search = parse_config({"weight_at": {"strategy": "fgsm_rs", "eps": 0.2}, "eval": {"n": 8}}, SearchConfig)
    assert (search.eval.eps, search.eval.norm, search.eval.n) == (0.2, "linf", 8)
    again = parse_config(json.loads(search.model_dump_json()), SearchConfig)  # a stored config reads back equal
    assert again == search


def _attack(run, out, *extra):
    assert main(["attack", str(run), "--n", "8", "--steps", "3", "--out", str(out), *extra]) == 0
    return torch.load(out / "adversarial.pt", weights_only=True)


def test_attack_is_seeded_and_saves_only_its_images(trained, tmp_path, capsys):
    a, b = _attack(trained, tmp_path / "a"), _attack(trained, tmp_path / "b")
    assert torch.equal(a["x_adv"], b["x_adv"])  # PGD's random start from --seed (default 0)
    c = _attack(trained, tmp_path / "c", "--seed", "1")
    assert not torch.equal(a["x_adv"], c["x_adv"])
    for v in a.values():  # not the whole test set x is a view of
        assert v.untyped_storage().nbytes() == v.numel() * v.element_size()
    needed = sum(v.numel() * v.element_size() for v in a.values())
    assert (tmp_path / "a" / "adversarial.pt").stat().st_size < needed + 4096  # + zip/pickle overhead
    out = capsys.readouterr().out
    assert "pgd (linf, eps 0.1, seed 0): fooled" in out and "seed 1): fooled" in out
    s1, s2 = (_attack(trained, tmp_path / f"sq{i}", "--attack", "square", "--queries", "10") for i in (1, 2))
    assert torch.equal(s1["x_adv"], s2["x_adv"])


def test_attack_l2_default_budget_and_n_beyond_the_test_set(trained, tmp_path, capsys):
    saved = _attack(trained, tmp_path / "fgm", "--attack", "fgm", "--n", "100000")
    n_test = len(saved["x"])
    assert 8 < n_test < 100000
    captured = capsys.readouterr()
    assert captured.err.strip() == f"note: --n 100000 asked, the test set has {n_test} images; all {n_test} used"
    assert "fgm (l2, eps 1, seed 0)" in captured.out  # L2's own default, not L-inf's 0.1
    dist = (saved["x_adv"] - saved["x"]).flatten(1).norm(dim=1)
    assert float(dist.max()) <= 1.0 + 1e-5 and float(dist.max()) > 0.5
    assert (
        main(["certify", str(trained), "--n", "100000", "--eps", "0.01", "--method", "ibp", "--out", str(tmp_path)])
        == 0
    )
    assert f"all {n_test} used" in capsys.readouterr().err


def test_evaluate_attack_certify_use_the_runs_threads_or_threads(trained, tmp_path):
    """The run's config threads (1 here) as search/train use them; --threads overrides."""
    commands = {
        "evaluate": ["--attacks", "fgsm", "--eps-linf", "0.1", "--n", "8"],
        "attack": ["--attack", "fgsm", "--n", "8"],
        "certify": ["--eps", "0.01", "--method", "ibp", "--n", "8"],
    }
    for cmd, extra in commands.items():
        argv = [cmd, str(trained), *extra, "--out", str(tmp_path / cmd)]
        torch.set_num_threads(2)
        assert main(argv) == 0
        assert torch.get_num_threads() == 1, cmd
        assert main([*argv, "--threads", "2"]) == 0
        assert torch.get_num_threads() == 2, cmd


def test_train_defaults(tmp_path, monkeypatch, capsys):
    """No --out: runs/train_<model>_<strategy>, never the searches' runs/search; no --strategy:
    the --config file's strategy, not standard."""
    from distsearch.cli_train import default_train_out

    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text("strategy: {strategy: fgsm, eps: 0.1}\n")
    argv = ["train", "--model", "mlp", "--config", "c.yaml", "--epochs", "1", *DATA, "--set", "eval.n=0"]
    assert main(argv) == 0
    out = tmp_path / "runs" / "train_mlp_fgsm"
    assert "distsearch evaluate runs/train_mlp_fgsm" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["strategy"]["strategy"] == "fgsm"
    assert not (tmp_path / "runs" / "search").exists()
    assert main(argv) == 2 and "--resume" in capsys.readouterr().err  # the same command finds it again
    (tmp_path / "m.yaml").write_text("model: {name: mlp}\nstrategy: {strategy: fgsm}\n")
    assert main(["validate", "--config", "m.yaml"]) == 0
    assert "storage runs/train_mlp_fgsm" in capsys.readouterr().out

    def named(genotype: str, strategy: str = "pgd") -> str:
        raw = {"model": {"genotype": genotype}, "strategy": {"strategy": strategy}}
        return default_train_out(parse_config(raw, TrainConfig))

    assert named("runs/qs") == "runs/train_qs_pgd"
    assert named("runs/qs/genotype.json") == "runs/train_qs_pgd"
    assert named("s3://b/p/best cell.json", "standard") == "runs/train_best_cell_standard"


def test_the_robust_package_names_its_public_surface_and_imports_it_on_use():
    """`from distsearch.robust import make_attack, ...`: each name is its module's own object;
    importing the package alone imports none of its modules (no Ray), nothing circular with the CLI."""
    import importlib
    import subprocess
    import sys

    import distsearch.robust as robust

    assert set(robust.__all__) == set(robust._SOURCE) and len(robust.__all__) == len(set(robust.__all__))
    for name in robust.__all__:
        module = importlib.import_module(f"distsearch.robust.{robust._SOURCE[name]}")
        assert getattr(robust, name) is getattr(module, name), name
    assert set(robust.__all__) <= set(dir(robust))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        robust.nope  # noqa: B018
    code = (
        "import sys, distsearch.robust as r; "
        "loaded = sorted(m for m in sys.modules if m.startswith('distsearch.robust.') or m == 'ray'); "
        "assert not loaded, loaded; import distsearch.cli; "
        "from distsearch.robust import make_attack, make_strategy, game_table, certify_table, spec_bounds; "
        "print(type(make_attack('pgd', eps=0.1)).__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "PGD", out.stderr


def test_out_takes_a_storage_uri_and_refuses_a_runs_own_folder(trained, tmp_path, monkeypatch, capsys):
    """--out of evaluate / attack / certify / report: a storage URI gets the files (they went to a
    local folder named 's3:' before, with a success message); a run's own folder is refused
    before any work, and nothing is written there."""
    import fsspec

    monkeypatch.chdir(tmp_path)
    mem = fsspec.filesystem("memory")
    for argv, files in (
        (["evaluate", str(trained), "--attacks", "fgsm", "--eps-linf", "0.1", "--n", "4"], {"robustness.csv"}),
        (["certify", str(trained), "--eps", "0.01", "--n", "4", "--method", "ibp"], {"certified.csv"}),
        (["attack", str(trained), "--attack", "fgsm", "--n", "4"], {"adversarial.pt", "before_after.png"}),
        (["report", str(trained)], {"report.md"}),
    ):
        uri = f"memory://outs/{argv[0]}"
        assert main([*argv, "--out", uri]) == 0
        assert files <= {p.rsplit("/", 1)[-1] for p in mem.find(f"/outs/{argv[0]}")}, argv[0]
        before = sorted(p.name for p in trained.iterdir())
        assert main([*argv, "--out", str(trained)]) == 2
        assert "is a run's own folder; choose another" in capsys.readouterr().err
        assert sorted(p.name for p in trained.iterdir()) == before
    assert list(tmp_path.iterdir()) == []  # no local 'memory:' folder
