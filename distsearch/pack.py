"""`distsearch pack FOLDER --out FILE.npz`: a folder of images, one subfolder per class (the
ImageFolder layout), packed into the .npz that `data.name: npz` reads (data_npz.py).

Classes are the subfolders that hold images, in sorted order (labels 0..K-1; their names are
stored as `class_names`). Each image is converted to RGB (or grey with --gray); with --size N it
is resized so its shorter side is N and centre-cropped to N x N, without it every image must
already be square and of one size. `--test FOLDER` packs a second folder of the same classes as
the test set (x_train/y_train/x_test/y_test), else x/y (the run holds out data.test_fraction).
The file is written whole or not at all; an existing one is refused.
"""

from __future__ import annotations

import argparse
import io
import os
from pathlib import Path

import numpy as np

from .errors import UsageError

EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


def _classes(folder: Path, field: str) -> dict[str, list[Path]]:
    if not folder.is_dir():
        raise UsageError(
            f"{field}: {str(folder)!r} is not a folder; give a folder with one subfolder of images per class"
        )
    found = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(f for f in sub.rglob("*") if f.suffix.lower() in EXTENSIONS and not f.name.startswith("."))
        if files:
            found[sub.name] = files
    if len(found) < 2:
        raise UsageError(
            f"{field}: {str(folder)!r} has {len(found)} subfolder(s) with images; give one subfolder per class "
            f"(two or more), e.g. {folder}/cat/1.png and {folder}/dog/2.png"
        )
    return found


def _image(path: Path, size: int | None, gray: bool, field: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("L" if gray else "RGB")
            if size is not None:
                scale = size / min(im.size)
                w, h = max(size, round(im.width * scale)), max(size, round(im.height * scale))
                im = im.resize((w, h), Image.Resampling.BILINEAR)
                left, top = (w - size) // 2, (h - size) // 2
                im = im.crop((left, top, left + size, top + size))
            a = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as e:
        raise UsageError(f"{field}: {path} is not a readable image ({type(e).__name__}: {e}); remove it") from None
    return a[None] if gray else a.transpose(2, 0, 1)


def _pack(classes: dict[str, list[Path]], names: list[str], size: int | None, gray: bool, field: str) -> tuple:
    from tqdm import tqdm

    total = sum(len(v) for v in classes.values())
    images, labels, shapes = [], [], set()
    with tqdm(total=total, desc="pack", unit="image", disable=total < 500) as bar:
        for name, files in classes.items():
            for f in files:
                a = _image(f, size, gray, field)
                shapes.add(a.shape[1:])
                if len(shapes) > 1 or a.shape[1] != a.shape[2]:
                    raise UsageError(
                        f"--size: the images differ in size or are not square ({f}: {a.shape[2]}x{a.shape[1]}); "
                        "give --size N to resize each to N x N (shorter side to N, then a centre crop)"
                    )
                images.append(a)
                labels.append(names.index(name))
                bar.update()
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def cmd_pack(args: argparse.Namespace) -> int:
    if "://" in args.out or not args.out.strip():
        raise UsageError(f"--out: {args.out!r}: give a local .npz file name (pack writes to this machine's disk)")
    if os.path.exists(args.out):
        what = "is a folder" if os.path.isdir(args.out) else "exists"
        raise UsageError(f"--out: {args.out!r} {what}; choose another file name or delete it")
    parent = os.path.dirname(os.path.abspath(args.out))
    while not os.path.exists(parent):  # the nearest folder that exists must be a folder
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UsageError(f"--out: {parent} is a file, not a folder; choose another place for {args.out!r}")
    if args.size is not None and not 4 <= args.size <= 1024:
        raise UsageError(f"--size: must be 4 to 1024 (the networks' smallest images; memory), got {args.size}")
    train = _classes(Path(args.folder), "FOLDER")
    names = list(train)
    arrays: dict[str, np.ndarray] = {"class_names": np.asarray(names)}
    x, y = _pack(train, names, args.size, args.gray, "FOLDER")
    if args.test:
        test = _classes(Path(args.test), "--test")
        unknown = sorted(set(test) - set(names))
        if unknown:
            raise UsageError(f"--test: classes {unknown} have no training images in FOLDER; the classes are {names}")
        xt, yt = _pack(test, names, args.size, args.gray, "--test")
        if xt.shape[1:] != x.shape[1:]:
            raise UsageError(f"--test: images of {xt.shape[1:]}, FOLDER's are {x.shape[1:]}; give --size N")
        arrays |= {"x_train": x, "y_train": y, "x_test": xt, "y_test": yt}
    else:
        arrays |= {"x": x, "y": y}
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = f"{args.out}.part-{os.getpid()}"
    try:  # whole or not at all
        with open(tmp, "wb") as f:
            f.write(buffer.getvalue())
        os.replace(tmp, args.out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    n_test = f" and {len(arrays['x_test'])} test" if args.test else ""
    print(f"packed {len(x)} training{n_test} images of {'x'.join(map(str, x.shape[1:]))}, {len(names)} classes")
    print("labels: " + ", ".join(f"{i} {name}" for i, name in enumerate(names)))
    print(f"search on them: distsearch search --config CONFIG --set data.name=npz --set data.path={args.out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pack", help="pack a folder of images (one subfolder per class) into an .npz for data.name npz")
    p.add_argument("folder", metavar="FOLDER", help="one subfolder of images per class")
    p.add_argument("--out", required=True, help="the .npz file to write (refused if it exists)")
    p.add_argument(
        "--size", type=int, help="resize to N x N: shorter side to N, centre crop (default: keep, all square)"
    )
    p.add_argument("--test", metavar="FOLDER", help="a test set of the same classes (default: none; the run holds out)")
    p.add_argument("--gray", action="store_true", help="one grey channel instead of RGB")
    p.set_defaults(func=cmd_pack)
