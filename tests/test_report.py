"""`distsearch report`: a Markdown page with real PNG plots for a search store and for an
experiment root (a summary row and a section per trial); a URI holding no run exits 2 and
writes nothing."""

from __future__ import annotations

import re

from distsearch.cli import main
from distsearch.runner import run_search
from distsearch.storage import Store

PNG = b"\x89PNG\r\n\x1a\n"


def _images_exist(folder, text: str) -> list[str]:
    names = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert names and all((folder / n).read_bytes().startswith(PNG) for n in names)
    return names


def test_report_of_a_search(tmp_path, tiny_config):
    store = Store(str(tmp_path / "run"))
    result = run_search(tiny_config(store.uri), store)
    assert main(["report", store.uri]) == 0
    folder = tmp_path / "run" / "report"
    text = (folder / "report.md").read_text()
    assert "## run" in text and "search (darts) on synthetic, " in text and "State: finished." in text
    assert "Data: " in text and " test images of 1x8x8, " in text  # what it was made on (data.json)
    assert result.genotype.normal[0][0] in text  # the genotype JSON
    names = _images_exist(folder, text)
    assert {"run_curves.png", "run_normal.png", "run_reduce.png", "run_alpha_normal.png"} <= set(names)


def test_report_of_an_experiment_root(tmp_path, tiny_config):
    for trial in ("t1", "t2"):
        uri = str(tmp_path / "exp" / trial / "search")
        run_search(tiny_config(uri, epochs=1, seed=int(trial[1])), Store(uri))
    assert main(["report", str(tmp_path / "exp"), "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "report.md").read_text()
    assert "2 run(s)." in text and "## t1" in text and "## t2" in text
    assert "| t1 | darts | standard | 1 |" in text and "| t2 | darts | standard | 1 |" in text  # the summary
    _images_exist(tmp_path / "out", text)


def test_report_of_an_unfinished_run_shows_its_latest_metrics(tmp_path, tiny_config):
    import pytest

    from distsearch.runner import Interrupted

    store = Store(str(tmp_path / "half"))
    with pytest.raises(Interrupted):
        run_search(tiny_config(store.uri, epochs=3), store, stop_after_steps=6)  # epoch 1 of 3 checkpointed
    assert main(["report", store.uri, "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "report.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| half |"))
    assert "| 1 (unfinished) |" in row and re.search(r"\| \d{1,3}\.\d{2} \|", row), row  # epoch 1's metrics, in %
    assert "State: at epoch 1 (unfinished)." in text


def test_report_of_a_training_run_shows_its_genotype_and_accuracies_in_percent(tmp_path):
    import json

    genotype = {
        "normal": [["sep_conv_3x3", 0], ["skip_connect", 1]],
        "normal_concat": [2],
        "reduce": [["max_pool_3x3", 0], ["avg_pool_3x3", 1]],
        "reduce_concat": [2],
    }
    (tmp_path / "g.json").write_text(json.dumps(genotype))
    data = ["data.name=synthetic", "data.synthetic.n=96", "data.synthetic.image_size=8", "data.batch_size=32"]
    data += ["threads=1", "monitor.progress=false", "eval.n=8", "model.C=2", "model.layers=3"]
    argv = ["train", "--genotype", str(tmp_path / "g.json"), "--epochs", "1", "--out", str(tmp_path / "tr")]
    assert main(argv + [a for d in data for a in ("--set", d)]) == 0
    metrics = json.loads((tmp_path / "tr" / "result.json").read_text())["metrics"]
    assert main(["report", str(tmp_path / "tr"), "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "report.md").read_text()
    assert "Genotype (trained):" in text and '["sep_conv_3x3", 0]' in text
    assert {"tr_normal.png", "tr_reduce.png", "tr_curves.png"} <= set(_images_exist(tmp_path / "out", text))
    assert "Accuracies are in % throughout" in text and "| metric | value (accuracies in %) |" in text
    assert f"| test/robust_acc_pgd20 | {100 * metrics['test/robust_acc_pgd20']:.2f} |" in text
    assert f"| test/loss | {metrics['test/loss']:.4g} |" in text  # not an accuracy: as it is


def test_report_refuses_a_uri_without_runs(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "holds no run" in capsys.readouterr().err
    assert list((tmp_path / "empty").iterdir()) == []


def test_report_and_status_of_a_run_whose_config_json_was_deleted(tmp_path, tiny_config, capsys):
    """config.json deleted by hand: report and status read what the newest valid checkpoint
    records (as --resume does), for one run and for an experiment's trials; with no checkpoint
    either, report says there is no run."""
    for trial in ("t1", "t2"):
        uri = str(tmp_path / "exp" / trial / "search")
        run_search(tiny_config(uri, epochs=1), Store(uri))
    (tmp_path / "exp" / "t2" / "search" / "config.json").unlink()
    run = str(tmp_path / "exp" / "t2" / "search")
    capsys.readouterr()
    assert main(["status", run]) == 0
    out = capsys.readouterr().out
    assert "search (darts) on synthetic, epoch 1 of 1" in out and "finished:" in out, out
    assert main(["report", str(tmp_path / "exp"), "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "report.md").read_text()
    assert "2 run(s)." in text and "| t2 | darts | standard | 1 |" in text
    assert "search (darts) on synthetic, 1 epoch" in text.split("## t2")[1]
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "holds no run" in capsys.readouterr().err
