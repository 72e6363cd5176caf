"""A user's own data set (`data.name: npz`): arrays in a .npz file (numpy.savez) at any fsspec URI.

Keys, one of two layouts:
- `x_train`, `y_train`, and optionally `x_test`, `y_test` (both or neither);
- `x`, `y`: one set.
Without test arrays a seeded `test_fraction` is held out, as for mnist5k. Both sets are shuffled
with the seed either way: the bilevel split takes D_tr and D_val as the first and the last part of
the training set, and `--n`, `eval.n` and `data.subset` the first test images, which a file sorted
by label would make one or two classes.
`x`: square images [N, H, W] (one channel), [N, C, H, W] or [N, H, W, C] (channels last when axes
1 and 2 are equal and axis 3 is not); uint8 (divided by 255) or floating point in [0, 1].
`y`: integer class labels [N], 0..K-1 with each class among the training labels (1-based or gappy
labels would give classes never seen); an optional scalar `num_classes` sets K when some are unused,
optional `class_names` name them (K strings; `distsearch pack` writes them: pack.py).
Read with allow_pickle=False: nothing is unpickled (an object array is refused), and every
problem is one DataError naming data.path, the key and the fix.
"""

from __future__ import annotations

import io
import zipfile
from typing import Any

import numpy as np
import torch

from .data import DataError, DataSplits, holdout

KEYS = ("x_train", "y_train", "x_test", "y_test", "x", "y", "num_classes", "class_names")


def _no_file(path: str) -> DataError:
    return DataError(f"data.path: no file {path!r}; give the path or URI of a .npz file")


def _folder(path: str) -> DataError:
    return DataError(f"data.path: {path!r} is a folder; give the .npz file's path or URI")


def check_files(cfg: Any) -> None:
    """Each .npz a config reads (data.path, and each sampled by an experiment's tune.params), read
    and checked as the run will read it: `validate`, and `run` before Ray starts."""
    from .config import local_path

    spec = cfg.tune.params.get("data.path") if getattr(cfg, "tune", None) else None
    sampled = (spec.choice or spec.grid or []) if spec is not None else []
    for path in dict.fromkeys([cfg.data.path, *(local_path(p) for p in sampled if isinstance(p, str))]):
        if path:
            load_npz(path, cfg.seed, cfg.data.test_fraction)


def _read(path: str) -> dict[str, np.ndarray]:
    import fsspec

    try:
        with fsspec.open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise _no_file(path) from None
    except IsADirectoryError:
        raise _folder(path) from None
    except Exception as e:  # any backend's error (botocore's NoCredentialsError is no OSError)
        raise DataError(f"data.path: cannot read {path!r} ({type(e).__name__}: {e})") from None
    not_npz = f"data.path: {path!r} is not a .npz archive; write one with numpy.savez(path, x_train=..., y_train=...)"
    try:
        loaded = np.load(io.BytesIO(raw), allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile):
        raise DataError(not_npz) from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise DataError(not_npz)
    with loaded:
        try:
            return {k: loaded[k] for k in loaded.files}
        except ValueError:  # "Object arrays cannot be loaded when allow_pickle=False"
            raise DataError(
                f"data.path: {path!r} holds object arrays, which would need unpickling; save plain numeric "
                "arrays (e.g. np.stack(images).astype(np.uint8) and labels as int64)"
            ) from None
        except (OSError, EOFError, zipfile.BadZipFile) as e:
            raise DataError(f"data.path: {path!r} is damaged ({type(e).__name__}: {e})") from None


def _images(path: str, key: str, a: np.ndarray) -> np.ndarray:
    where = f"data.path: {path!r}, {key}"
    if a.dtype == np.uint8:
        x = a.astype(np.float32) / 255.0
    elif np.issubdtype(a.dtype, np.floating):
        x = a.astype(np.float32)
        if not np.isfinite(x).all():
            raise DataError(f"{where}: the images hold NaN or infinite values")
        if x.size and (x.min() < 0 or x.max() > 1):
            raise DataError(
                f"{where}: floating-point images must lie in [0, 1], got [{x.min():g}, {x.max():g}]; scale them "
                "(e.g. x / 255) or store uint8"
            )
    else:
        raise DataError(f"{where}: images of dtype {a.dtype}; store uint8 (0-255) or floats in [0, 1]")
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim != 4:
        raise DataError(f"{where}: images of shape {a.shape}; give [N, H, W], [N, C, H, W] or [N, H, W, C]")
    elif x.shape[2] != x.shape[3] and x.shape[1] == x.shape[2]:  # square in axes 1, 2: channels last
        x = x.transpose(0, 3, 1, 2)
    if x.shape[2] != x.shape[3]:
        raise DataError(
            f"{where}: images of shape {a.shape} are not square in [N, C, H, W] nor in [N, H, W, C]; the "
            "networks take square images (crop or pad them)"
        )
    if len(x) == 0:
        fix = "; leave x_test and y_test out to hold out data.test_fraction" if key == "x_test" else ""
        raise DataError(f"{where}: holds no images{fix}")
    return np.ascontiguousarray(x)


def _labels(path: str, key: str, a: np.ndarray, n: int) -> np.ndarray:
    where = f"data.path: {path!r}, {key}"
    if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
        raise DataError(
            f"{where}: class labels must be a 1-D integer array, got shape {a.shape} of dtype {a.dtype} "
            "(one-hot labels: y.argmax(1))"
        )
    if len(a) != n:
        raise DataError(f"{where}: {len(a)} labels for {n} images")
    if a.dtype.kind == "u" and a.size and a.max() > np.iinfo(np.int64).max:
        raise DataError(f"{where}: labels up to {a.max()} do not fit int64; number the classes 0..K-1")
    if a.min() < 0:
        raise DataError(f"{where}: labels must be >= 0, got {a.min()}")
    return a.astype(np.int64)


def load_npz(path: str | None, seed: int, test_fraction: float) -> DataSplits:
    """The DataSplits of the .npz file at `path` (module text)."""
    if not path:
        raise DataError("data.path: data.name npz reads a .npz file; set data.path to its path or URI")
    arrays = _read(path)
    unknown = sorted(set(arrays) - set(KEYS))
    layout = ("x_train", "y_train") if "x_train" in arrays or "y_train" in arrays else ("x", "y")
    mixed = {"x", "y"} & set(arrays) and layout == ("x_train", "y_train")
    missing = [k for k in layout if k not in arrays]
    test = [k for k in ("x_test", "y_test") if k in arrays]
    if unknown or mixed or missing or len(test) == 1 or (test and layout == ("x", "y")):
        raise DataError(
            f"data.path: {path!r} holds the arrays {sorted(arrays)}; expected x_train, y_train (and optionally "
            "both x_test, y_test), or x, y alone (optional: a scalar num_classes, class_names)"
        )
    x = _images(path, layout[0], arrays[layout[0]])
    y = _labels(path, layout[1], arrays[layout[1]], len(x))
    highest = int(y.max())
    if test:
        xt = _images(path, "x_test", arrays["x_test"])
        yt = _labels(path, "y_test", arrays["y_test"], len(xt))
        if xt.shape[1:] != x.shape[1:]:
            raise DataError(f"data.path: {path!r}: x_test images are {xt.shape[1:]}, x_train's {x.shape[1:]}")
        highest = max(highest, int(yt.max()))
    classes = highest + 1
    seen = set(np.unique(y).tolist())
    if len(seen) < classes and "num_classes" not in arrays:  # the first few absent ones, without range(classes)
        absent = [c for c in range(min(classes, len(seen) + 5)) if c not in seen][:5]
        more = classes - len(seen) - len(absent)
        shown = ", ".join(map(str, absent)) + (f" and {more} more" if more else "")
        raise DataError(
            f"data.path: {path!r}, {layout[1]}: the labels run to {highest}, but class(es) {shown} never occur "
            f"in {layout[1]}; number the classes 0..K-1 (np.unique(y, return_inverse=True)) or store "
            "num_classes to keep unused ones"
        )
    if "num_classes" in arrays:
        given = arrays["num_classes"]
        if given.ndim != 0 or not np.issubdtype(given.dtype, np.integer) or int(given) <= highest:
            raise DataError(
                f"data.path: {path!r}, num_classes: must be an integer scalar above the highest label "
                f"({highest}), got {given.tolist()!r}"
            )
        classes = int(given)
    names = arrays.get("class_names")
    if names is not None and (names.ndim != 1 or names.dtype.kind != "U" or len(names) != classes):
        raise DataError(
            f"data.path: {path!r}, class_names: must be {classes} strings, one per class, got "
            f"{names.dtype} {names.shape}"
        )
    if classes < 2:
        raise DataError(f"data.path: {path!r}: the labels name one class; a classifier needs two or more")
    names = None if names is None else tuple(map(str, names))
    if not test:
        d = holdout(x, y, seed, test_fraction, classes, names)
        if not len(d.x_train) or not len(d.x_test):
            raise DataError(
                f"data.path: {path!r}: data.test_fraction {test_fraction} of {len(x)} images leaves an empty "
                "training or test set; give more images, another test_fraction, or x_test and y_test"
            )
        return d
    g = np.random.default_rng(seed)
    perm, perm_t = g.permutation(len(x)), g.permutation(len(xt))
    return DataSplits(
        torch.from_numpy(x[perm]),
        torch.from_numpy(y[perm]),
        torch.from_numpy(xt[perm_t]),
        torch.from_numpy(yt[perm_t]),
        classes,
        names,
    )
