"""`distsearch evaluate | attack | certify`: the robustness library's evaluations of a run from
the command line (training commands: cli_train.py). Tables are written as CSV + Markdown with
a plot, into --out (a local folder) or, by default, into the run's store under eval/, attack/,
certify/.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable
from typing import Any

from .cli import add_threads_arg
from .errors import UsageError, out_folder

ATTACK_EPS = {"linf": 0.1, "l2": 1.0}  # `attack`'s default budget per norm, for images in [0, 1] (MNIST-sized)
RUN_THREADS = "the run's config threads"


def check_out(args: argparse.Namespace, sub: str) -> None:
    """Before any work: an --out that is a run's or an experiment's own folder is refused (the
    tables would land among its files; <URI>/<sub>, the default, is where they belong)."""
    if not args.out:
        return
    from .distributed.trainable import EXPERIMENT_FILE  # a constant: no ray imported
    from .storage import Store

    store = Store(args.out, field="--out")
    if store.exists("config.json") or store.exists(EXPERIMENT_FILE):
        raise UsageError(f"--out: {args.out} is a run's own folder; choose another (default: <URI>/{sub})")


def _outputs(args: argparse.Namespace, sub: str, write: Callable[[str], None]) -> str:
    """Run `write(folder)` into a local --out, or into a temp folder copied to a storage URI --out
    (s3://, gs://, file://) or, without --out, to <uri>/<sub>."""
    from .storage import Store

    if args.out and "://" not in args.out:
        os.makedirs(args.out, exist_ok=True)
        write(args.out)
        return args.out
    store = Store(args.out, field="--out") if args.out else Store(args.uri, field="URI")
    with tempfile.TemporaryDirectory() as tmp:
        write(tmp)
        store.upload_dir(tmp, "" if args.out else sub)
    return args.out or f"{store.uri.rstrip('/')}/{sub}"


def _eval_set(data: Any, n: int) -> tuple[Any, Any]:
    return data.x_test[:n], data.y_test[:n]


def _note_n(asked: int, used: int) -> None:
    """After the results (a bad argument stays one line): --n beyond the test set used all of it."""
    if asked > used:
        print(f"note: --n {asked} asked, the test set has {used} images; all {used} used", file=sys.stderr)


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    """The run's model and data, torch set up as its search/training was (--threads overrides its threads)."""
    from .data import DataError
    from .runner import resolve_device
    from .train import load_model

    check_out(args, args.command if args.command != "evaluate" else "eval")
    try:
        model, data, info = load_model(
            args.uri, device=resolve_device(args.device), setup=True, threads=args.threads, data_at=args.data
        )
    except DataError as e:
        if args.data is not None:
            raise DataError(f"--data: {e}") from None
        raise DataError(f"{e}; or pass --data with where the run's data is on this machine") from None
    if info["other_data"]:
        print(f"note: not the images the run was made on; the results are for {info['other_data']}", file=sys.stderr)
    return model, data


def add_load_args(p: argparse.ArgumentParser) -> None:
    """How a run is loaded here: --device, and --data (where its data set is on this machine)."""
    p.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="where the model and the attacks run (default: auto, cuda when a GPU is visible)",
    )
    p.add_argument(
        "--data",
        metavar="LOCATION",
        help="where the run's data set is on this machine: the torchvision folder (its data.root) or the .npz "
        "file (its data.path) (default: where the run recorded it)",
    )


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .robust.evaluate import DEFAULT_ATTACKS, expand_attacks, game_table, plot_robustness, write_csv, write_markdown
    from .robust.tables import to_markdown

    try:  # before the model is loaded: a misspelt name fails at once
        attacks = expand_attacks(args.attacks or DEFAULT_ATTACKS)
    except ValueError as e:
        raise UsageError(f"--{e}") from None
    eps = {k: v for k, v in (("linf", args.eps_linf), ("l2", args.eps_l2)) if v}
    if not eps:
        raise UsageError("--eps-linf / --eps-l2: give at least one budget")
    if args.attacks and "cw" in attacks and "l2" not in eps:  # asked for: not left out without a word
        raise UsageError("--attacks: cw runs at L2 budgets only; add --eps-l2 BUDGET ... or leave cw out")
    model, data = _load(args)
    x, y = _eval_set(data, args.n)
    try:
        rows = game_table(model, x, y, eps, attacks=attacks, seed=args.seed, progress=True)
    except ValueError as e:
        raise UsageError(str(e)) from None

    def write(folder: str) -> None:
        write_csv(rows, os.path.join(folder, "robustness.csv"))
        write_markdown(rows, os.path.join(folder, "robustness.md"))
        plot_robustness(rows, os.path.join(folder, "robustness.png"), title=os.path.basename(args.uri.rstrip("/")))

    print(to_markdown(rows))
    print(f"table and plot in {_outputs(args, 'eval', write)}")
    _note_n(args.n, len(x))
    return 0


def cmd_attack(args: argparse.Namespace) -> int:
    import torch

    from .robust.attacks import make_attack

    l2_only = args.attack in ("fgm", "cw")
    norm = args.norm or ("l2" if l2_only else "linf")
    if l2_only and norm != "l2":
        raise UsageError(f"--norm: attack {args.attack!r} is L2 only; pass --norm l2 or leave --norm out")
    eps = args.eps if args.eps is not None else ATTACK_EPS[norm]
    model, data = _load(args)
    x, y = _eval_set(data, args.n)
    if args.attack in ("pgd", "apgd", "apgd-t", "fab", "fab-t"):
        spec = (args.attack, {"eps": eps, "steps": args.steps, "norm": norm})
    elif args.attack == "square":  # gradient-free: a budget of queries, not steps
        spec = ("square", {"eps": eps, "norm": norm, "n_queries": args.queries, "seed": args.seed})
    elif args.attack == "fgsm":  # FGSM's L2 form is FGM
        spec = ("fgsm", {"eps": eps}) if norm == "linf" else ("fgm", {"eps": eps})
    elif args.attack == "lbfgs":  # minimum-distortion attack: no budget
        spec = ("lbfgs", {})
    else:
        spec = (args.attack, {"eps": eps})
    try:
        attack = make_attack(spec[0], **spec[1])
    except ValueError as e:
        raise UsageError(str(e)) from None
    torch.manual_seed(args.seed)  # PGD's and APGD's random starts: a rerun gives the same examples
    device = next(model.parameters()).device
    x_adv = attack(model, x.to(device), y.to(device)).cpu()
    with torch.no_grad():
        pred, pred_adv = model(x.to(device)).argmax(1).cpu(), model(x_adv.to(device)).argmax(1).cpu()
    fooled = float(((pred == y) & (pred_adv != y)).float().sum() / (pred == y).float().sum().clamp_min(1))
    dist = (x_adv - x).flatten(1).norm(dim=1)

    def write(folder: str) -> None:
        saved = {"x": x, "x_adv": x_adv, "y": y, "pred": pred, "pred_adv": pred_adv}
        # clones: x is a view of the whole test set, and torch.save writes a view's whole storage
        torch.save({k: v.detach().clone() for k, v in saved.items()}, os.path.join(folder, "adversarial.pt"))
        from . import plots

        title = args.attack + ("" if args.attack == "lbfgs" else f" ({norm}, ε = {eps:g})")
        figure = plots.before_after(x, x_adv, y, pred, pred_adv, title, names=data.class_names)
        plots.save(figure, os.path.join(folder, "before_after.png"))

    where = _outputs(args, "attack", write)
    budget = "" if args.attack == "lbfgs" else f" ({norm}, eps {eps:g}, seed {args.seed})"
    print(
        f"{args.attack}{budget}: fooled {fooled:.1%} of the correctly classified, clean acc "
        f"{float((pred == y).float().mean()):.1%} -> {float(((pred == y) & (pred_adv == y)).float().mean()):.1%}, "
        f"mean L2 distortion {float(dist.mean()):.4f}"
    )
    print(f"adversarial examples and the before/after grid (original, adversarial, perturbation) in {where}")
    _note_n(args.n, len(x))
    return 0


def cmd_certify(args: argparse.Namespace) -> int:
    from .robust.certify import certify_table, plot_certified_accuracy
    from .robust.tables import to_markdown, write_csv, write_markdown

    model, data = _load(args)
    x, y = _eval_set(data, args.n)
    if args.float64:  # rounding of the bounds ~1e-14 of the logit scale instead of ~1e-6
        model = model.double()
    try:
        rows = certify_table(
            model,
            x,
            y,
            args.eps,
            norm=args.norm,
            method=args.method,
            progress=True,
            label=os.path.basename(args.uri.rstrip("/")),
        )
    except ValueError as e:
        raise UsageError(str(e)) from None

    def write(folder: str) -> None:
        write_csv(rows, os.path.join(folder, "certified.csv"))
        write_markdown(rows, os.path.join(folder, "certified.md"))
        plot_certified_accuracy(rows, os.path.join(folder, "certified.png"))

    print(to_markdown(rows))
    print(f"table and plot in {_outputs(args, 'certify', write)}")
    _note_n(args.n, len(x))
    if rows[0]["clean_acc"] > 0 and not any(r["certified_acc"] for r in rows):
        print(
            f"note: nothing certified at any eps (mean certified radius {rows[0]['mean_certified_radius']:.3g}): "
            "the bounds of deep networks trained without certification in mind are loose; try a smaller --eps"
            + (", --method crown" if args.method == "ibp" else "")
            + ", or a network searched or trained for it (DSRNA certified)",
            file=sys.stderr,
        )
    return 0


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < v <= 1e4:  # budgets, step sizes and radii of images in [0, 1]: far below
        raise argparse.ArgumentTypeError(f"must be a number > 0 and at most 1e4, got {text}")
    return v


def _whole(lo: int, hi: int) -> Callable[[str], int]:
    """An argparse type: a whole number from `lo` to `hi` (an attack of 10**12 steps never ends)."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"must be from {lo} to {hi}, got {v}")
        return v

    return parse


_seed = _whole(0, 2**32 - 1)
_images = _whole(1, 10**7)  # --n: more than the test set has means all of it


def register(sub: argparse._SubParsersAction) -> None:
    uri = "a search's or training's --out (path, file://, s3://, gs://); its newest valid checkpoint is used"
    p = sub.add_parser("evaluate", help="game-based robustness table and plot for a run's newest checkpoint")
    p.add_argument("uri", help=uri)
    p.add_argument(
        "--eps-linf",
        type=_positive_float,
        nargs="*",
        default=[0.05, 0.1, 0.2],
        help="L-inf budgets (default: %(default)s)",
    )
    p.add_argument(
        "--eps-l2",
        type=_positive_float,
        nargs="*",
        default=[],
        help="L2 budgets (default: none; cw runs only at L2 budgets; `--eps-linf` with no value leaves L-inf out)",
    )
    p.add_argument(
        "--attacks",
        nargs="+",
        help="any of fgsm, pgd-20, pgd-100, apgd-ce, apgd-dlr, apgd-t (APGD, 100 steps), cw, square "
        "(gradient-free, 5000 queries; several times the cost of the rest), fab-t (minimum-norm, 100 steps "
        "per target), and autoattack (AutoAttack's standard ensemble: apgd-ce apgd-t fab-t square) "
        "(default: all but square and fab-t; cw only with --eps-l2)",
    )
    p.add_argument(
        "--n",
        type=_images,
        default=200,
        help="first test images used (default: %(default)s; more than there are: all)",
    )
    p.add_argument(
        "--seed",
        type=_seed,
        default=0,
        help="seed of the attacks' random starts and square's draws (default: %(default)s)",
    )
    p.add_argument("--out", type=out_folder, help="folder or storage URI for the table and plot (default: <uri>/eval)")
    add_threads_arg(p, RUN_THREADS)
    add_load_args(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("attack", help="adversarial examples and a before/after grid for a run")
    p.add_argument("uri", help=uri)
    p.add_argument(
        "--attack",
        default="pgd",
        choices=["fgsm", "fgm", "pgd", "apgd", "apgd-t", "fab", "fab-t", "square", "lbfgs", "cw"],
        help="(default: pgd)",
    )
    p.add_argument(
        "--eps",
        type=_positive_float,
        help=f"budget in the --norm ball (default: {ATTACK_EPS['linf']} for linf, {ATTACK_EPS['l2']} for l2, "
        "as fgm and cw; for images in [0, 1]); cw: the radius it is projected onto; lbfgs: ignored",
    )
    p.add_argument("--norm", choices=["linf", "l2"], help="(default: l2 for fgm and cw, else linf)")
    p.add_argument(
        "--steps", type=_whole(1, 10**5), default=20, help="iterations of the iterative attacks (default: %(default)s)"
    )
    p.add_argument(
        "--queries",
        type=_whole(1, 10**6),
        default=5000,
        help="queries per image of the square attack (default: %(default)s)",
    )
    p.add_argument(
        "--n",
        type=_images,
        default=64,
        help="first test images attacked (default: %(default)s; more than there are: all)",
    )
    p.add_argument(
        "--seed",
        type=_seed,
        default=0,
        help="seed of the random starts (pgd, apgd, apgd-t) and of square's draws; fab and fab-t are deterministic "
        "(default: %(default)s)",
    )
    p.add_argument("--out", type=out_folder, help="folder or storage URI (default: <uri>/attack)")
    add_threads_arg(p, RUN_THREADS)
    add_load_args(p)
    p.set_defaults(func=cmd_attack)

    p = sub.add_parser("certify", help="certified accuracy and radius (verification-based evaluation)")
    p.add_argument("uri", help=uri)
    p.add_argument(
        "--eps", type=_positive_float, nargs="+", default=[0.005, 0.01, 0.02], help="budgets (default: %(default)s)"
    )
    p.add_argument("--norm", default="linf", choices=["linf", "l2"], help="(default: %(default)s)")
    p.add_argument(
        "--method", default="crown", choices=["ibp", "crown"], help="interval or linear bounds (default: %(default)s)"
    )
    p.add_argument(
        "--n",
        type=_images,
        default=100,
        help="first test images certified (default: %(default)s; more than there are: all)",
    )
    p.add_argument(
        "--float64",
        action="store_true",
        help="compute the forward and the bounds in float64: their rounding falls from about 1e-6 to 1e-14 of the "
        "logit scale (bounds are not rounded outward; an example counts when its bound exceeds 100 machine "
        "epsilons of its largest logit)",
    )
    p.add_argument("--out", type=out_folder, help="folder or storage URI (default: <uri>/certify)")
    add_threads_arg(p, RUN_THREADS)
    add_load_args(p)
    p.set_defaults(func=cmd_certify)
