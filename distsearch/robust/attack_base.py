"""The Attack interface and the norm-ball geometry every attack shares.

An Attack is a callable `attack(model, x, y) -> x_adv` on images in [0, 1] (any input
normalisation lives inside the model). `Attack.__call__` puts the model in eval mode
(unless `eval_mode=False`, which adversarial training uses to craft in the model's own
mode, as Madry et al. 2018 do), freezes the parameters' requires_grad so only input
gradients are computed, and restores both afterwards, even on error.

Input contract, checked by `__call__` with one ValueError naming the argument: x a floating-point
tensor [N, ...] (8-bit images: x.float() / 255); y [N, ...], and where y are class labels (every
attack but FGSM, FGM and PGD with a `loss_fn`) a 1-D integer tensor [N], cast to int64, each in
[0, K) for the model's K logits (checked on the attack's first forward, no extra query). The range
checks (x ∈ [0, 1], the labels' range) need a host sync each: `check_range=False` skips them, and
every attack built inside a training or search step (training.py's strategies) turns it off. An x
outside the box, unchecked, gets a result in its ε-ball (within_ball) but not in [0, 1], and
attacked as if the box were [0, 1]: its numbers mean nothing.

Geometry: the threat model is B_ε(x) = {x' : ‖x' − x‖_p ≤ ε} ∩ [0, 1]^m with p ∈ {∞, 2}.
Clamping x + δ to the box only shrinks each |δ_i|, so "project to the ball, then clamp to
the box" lands inside the intersection. In floating point, rounding can leave ‖x' − x‖ one ulp
beyond ε (the projection's scale, then x + δ − x); `within_ball` moves such points back, so every
result with a ball satisfies ‖x' − x‖_p ≤ ε exactly as measured in x's dtype.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NORMS = ("linf", "l2")


def ce_per_example(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with one value per example (so gradients do not depend on batch size)."""
    return F.cross_entropy(logits, y, reduction="none")


@contextlib.contextmanager
def eval_mode(model: nn.Module, on: bool = True) -> Iterator[nn.Module]:
    """The model in eval mode inside (unless `on` is False); every module's own mode back on exit
    (a frozen BatchNorm inside a training model stays in eval)."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        if on:
            model.eval()
        yield model
    finally:
        for m, mode in modes:
            m.training = mode


@contextlib.contextmanager
def attack_context(model: nn.Module, in_eval: bool = True) -> Iterator[None]:
    """Eval mode (unless `in_eval` is False) and frozen parameters inside; every module's mode and
    every parameter's requires_grad flag restored on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        with eval_mode(model, in_eval):
            for p, _ in flags:
                p.requires_grad_(False)
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def seeded(seed: int, *modules: nn.Module) -> Iterator[None]:
    """The CPU's generator, and those of the CUDA devices the modules' parameters live on, seeded
    as torch.manual_seed(seed) seeds them; on exit their states restored, so the caller's streams
    are untouched (other devices' generators are never touched)."""
    cuda = sorted({p.device.index for m in modules for p in m.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        torch.random.default_generator.manual_seed(seed)
        for index in cuda:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


def check_real(name: str, value: object) -> float:
    """`value` as a Python float: any real number (int, float, NumPy scalars; not bool). A tensor
    is refused (converting a CUDA one would wait for the device): pass float(value)."""
    if isinstance(value, torch.Tensor):
        raise ValueError(f"{name}: must be a real number, got a tensor {value!r}; pass float({name})")
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise ValueError(f"{name}: must be a real number, got {value!r}")
    return float(value)


def check_positive(name: str, value: float | int | None, allow_none: bool = False) -> float | None:
    """`value` as a Python float, checked finite and > 0 (None passes with `allow_none`)."""
    if value is None and allow_none:
        return None
    if isinstance(value, torch.Tensor):
        check_real(name, value)  # raises: names the tensor and the fix
    number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not number or not 0 < float(value) < math.inf:
        raise ValueError(f"{name}: must be a finite number > 0, got {value!r}")
    return float(value)


def check_int(name: str, value: int, minimum: int = 1) -> int:
    """`value` as a Python int, checked >= minimum (any integer: int, NumPy integers; not bool)."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}: must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm: must be one of {', '.join(NORMS)}, got {norm!r}")


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


def l2_norm(t: torch.Tensor) -> torch.Tensor:
    """Per-example L2 norm, shape [N]."""
    return t.flatten(1).norm(dim=1)


def normalize(g: torch.Tensor, norm: str) -> torch.Tensor:
    """Steepest-ascent direction of unit p-norm: sign(g) for L∞, g/‖g‖₂ per example for L2."""
    if norm == "linf":
        return g.sign()
    return g / _bcast(l2_norm(g).clamp_min(1e-12), g)


def project(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Euclidean projection of δ onto the ε-ball of the given norm (per example); up to rounding:
    `within_ball` makes the final point exact."""
    if norm == "linf":
        return delta.clamp(-eps, eps)
    scale = (eps / l2_norm(delta).clamp_min(1e-12)).clamp(max=1.0)
    return delta * _bcast(scale, delta)


def clip_box(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """δ' such that x + δ' = clamp(x + δ, 0, 1)."""
    return (x + delta).clamp(0.0, 1.0) - x


def radius(eps: float, dtype: torch.dtype) -> float:
    """ε rounded down to the precision of `dtype` (float32(0.1) exceeds 0.1: the float below it),
    in plain Python arithmetic: no tensor op, so no host sync."""
    bits = 1 - round(math.log2(torch.finfo(dtype).eps))  # significand bits, the implicit one included
    m, e = math.frexp(eps)
    return math.ldexp(math.floor(math.ldexp(m, bits)), e - bits)


def distance(x: torch.Tensor, x_adv: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-example ‖x_adv − x‖_p, shape [N], computed in x's dtype."""
    delta = x_adv - x
    return delta.flatten(1).abs().amax(1) if norm == "linf" else l2_norm(delta)


SHRINK_PASSES = 3  # L2: rounds of shrinking δ before giving up on a row


def within_ball(x: torch.Tensor, x_adv: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """x_adv with every point that rounding left beyond ε (by an ulp or so) moved back inside, so
    that `distance(x, ·, norm) <= eps` holds exactly in x's dtype (r: ε rounded down to it); points
    inside are unchanged. With u the spacing of the dtype's numbers at 1 (values in [0, 1] round by
    at most u/4): L∞: offending coordinates become x ± (r − u). L2: offending rows scale δ to the
    norm r·(1 − 16·4^k·u) − √m·u (m the values per example: room for the rounding of the norm,
    of δ·s and of x + δ − x), then clamp to the box. A point still outside after that (not seen
    in practice) is replaced by x. No host sync: fixed passes."""
    r = radius(eps, x.dtype)
    u, tiny = torch.finfo(x.dtype).eps, torch.finfo(x.dtype).tiny
    if norm == "linf":
        delta = x_adv - x
        x_adv = torch.where(delta.abs() > r, x + delta.sign() * max(r - u, 0.0), x_adv)
        return torch.where((x_adv - x).abs() > r, x, x_adv)
    slack = math.sqrt(math.prod(x.shape[1:])) * u
    for k in range(SHRINK_PASSES):
        delta = x_adv - x
        n = l2_norm(delta)
        target = max(r * (1 - 16 * 4**k * u) - slack, 0.0)
        over = _bcast(n > r, x)
        x_adv = torch.where(over, (x + delta * _bcast(target / n.clamp_min(tiny), x)).clamp(0.0, 1.0), x_adv)
    return torch.where(_bcast(l2_norm(x_adv - x) > r, x), x, x_adv)


def random_start(x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """δ uniform in the L∞ ball, or uniform in the L2 ball (Gaussian direction, radius ε·u^(1/d))."""
    if norm == "linf":
        delta = torch.empty_like(x).uniform_(-eps, eps)
    else:
        d = x[0].numel()
        direction = normalize(torch.randn_like(x), "l2")
        radius = eps * torch.rand(x.shape[0], device=x.device, dtype=x.dtype) ** (1.0 / d)
        delta = direction * _bcast(radius, x)
    return clip_box(x, delta)


def is_label(y: torch.Tensor, n: int) -> bool:
    return y.dim() == 1 and y.shape[0] == n and not y.is_floating_point()


def success(logits: torch.Tensor, y: torch.Tensor, targeted: bool) -> torch.Tensor:
    """Per-example: prediction differs from y (untargeted) or equals the target y (targeted)."""
    pred = logits.argmax(dim=1)
    return pred == y if targeted else pred != y


def runner_up(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The most likely class other than y: the natural target of an untargeted minimum-distortion attack."""
    return logits.scatter(1, y[:, None], float("-inf")).argmax(dim=1)


def top_targets(logits: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """[N, k]: the k classes other than y with the largest logits, most likely first: the targets
    of AutoAttack's targeted runs (APGD-T, FAB-T); k must be at most K − 1."""
    return logits.scatter(1, y[:, None], float("-inf")).topk(k, dim=1).indices


def check_inputs(x: object, y: object, labels: bool) -> torch.Tensor:
    """The sync-free checks of `Attack.__call__` (the module text); returns y, labels as int64."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x: must be a tensor of images [N, ...] in [0, 1], got {type(x).__name__}")
    if not x.is_floating_point():
        hint = "; convert 8-bit images with x.float() / 255" if x.dtype == torch.uint8 else "; use x.float()"
        raise ValueError(f"x: must be a floating-point tensor of images in [0, 1], got dtype {x.dtype}{hint}")
    if x.dim() < 2:
        raise ValueError(f"x: needs a batch dimension, [N, ...], got shape {tuple(x.shape)}; e.g. x[None]")
    if not isinstance(y, torch.Tensor):
        raise ValueError(f"y: must be a tensor with one entry per image of x, got {type(y).__name__}")
    if y.dim() == 0 or y.shape[0] != x.shape[0]:
        raise ValueError(
            f"y: needs one entry per image of x (first dimension {x.shape[0]}), got shape {tuple(y.shape)}"
        )
    if labels:
        if y.dim() != 1 or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise ValueError(
                f"y: the class labels must be a 1-D integer tensor [{x.shape[0]}], got shape {tuple(y.shape)} "
                f"of dtype {y.dtype}; e.g. y.view(-1).long()"
            )
        y = y.long()
    return y


@contextlib.contextmanager
def labels_checked(model: nn.Module, y: torch.Tensor) -> Iterator[None]:
    """Inside, the model's first forward that returns logits [n, K] checks 0 <= y < K (one host sync,
    no extra forward, so query-counting attacks spend nothing on it) and raises a ValueError naming
    the labels found and K. Without it, cross-entropy raises an IndexError for y >= K, ignores
    y = -100, and Square and FAB count such an example as misclassified and leave it unattacked."""
    lo, hi = (y.min(), y.max()) if y.numel() else (None, None)

    def hook(module: nn.Module, args: object, out: object) -> None:
        if not isinstance(out, torch.Tensor) or out.dim() != 2:
            return  # not logits: the next forward checks
        handle.remove()
        classes = out.shape[1]
        if not bool((lo >= 0) & (hi < classes)):  # the one sync
            raise ValueError(
                f"y: class labels must lie in [0, {classes - 1}] (the model gives {classes} logits), "
                f"got labels in [{int(lo)}, {int(hi)}]"
            )

    handle = model.register_forward_hook(hook) if lo is not None else None
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()


def check_unit_range(x: torch.Tensor) -> None:
    """x ∈ [0, 1], else a ValueError naming the range found. One host sync (min and max)."""
    if x.numel() == 0:
        return
    lo, hi = torch.aminmax(x.detach())
    if not bool((lo >= 0) & (hi <= 1)):  # the one sync; NaN fails too
        raise ValueError(
            f"x: the attacks take images in [0, 1], got values in [{float(lo):g}, {float(hi):g}]; put any "
            "normalisation inside the model (e.g. nn.Sequential(normalize, net)), and pass 8-bit images "
            "as x.float() / 255"
        )


class Attack:
    """Base class: subclasses implement `perturb(model, x, y)`; `__call__` checks the inputs, handles
    modes and flags, and keeps the result in the attack's ball (`eps`, `norm`) exactly."""

    eval_mode: bool = True
    check_range: bool = True  # False: skip the x ∈ [0, 1] and label checks and their host syncs (training, search)
    eps: float | None = None  # the ball of the result, if any
    norm: str = "linf"

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def labels(self) -> bool:
        """Whether y are class labels (every attack but those given a `loss_fn`)."""
        return getattr(self, "loss_fn", None) is None

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        y = check_inputs(x, y, self.labels())
        if self.check_range:
            check_unit_range(x)
        x, y = x.detach(), y.detach()
        checked = labels_checked(model, y) if self.check_range and self.labels() else contextlib.nullcontext()
        with attack_context(model, self.eval_mode), checked:
            x_adv = self.perturb(model, x, y)
        if self.eps is not None:
            x_adv = within_ball(x, x_adv.detach(), self.eps, self.norm)
        return x_adv.detach()

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not callable(v))
        return f"{type(self).__name__}({fields})"
