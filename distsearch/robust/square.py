"""Square Attack (Andriushchenko, Croce, Flammarion & Hein, ECCV 2020, "Square Attack: a
query-efficient black-box adversarial attack via random search", algorithms 1-3): score-based
and gradient-free, so masked or obfuscated gradients do not stop it; AutoAttack's black-box
member.

Random search on the margin of the logits, per example, L(x') = z_y(x') − max_{k≠y} z_k(x'):
    x̂ ← init(x);  repeat:  x_new = Π(x̂ + δ),  δ ~ P(ε, h_i, x̂, x);  x̂ ← x_new if L(x_new) < L(x̂)
until x̂ is misclassified or the queries are spent, Π the projection onto B_ε(x) ∩ [0, 1]^m.
δ changes one h_i × h_i square of the image (all channels) at a uniformly random position:
    L∞ (alg. 2): the square becomes x ± ε, one random sign per channel (Π(x̂ ± 2ε) in the paper);
        init: vertical stripes, each column x ± ε with one random sign per channel;
    L2 (alg. 3): a second square W2 is emptied and its mass moved into W1, which becomes its old
        content (normalised) plus ρ·η, ρ = ±1 per channel, with the per-channel norm
        √(‖ν_{W1∪W2}‖² + (ε² − ‖ν‖²)/c), ν = x̂ − x, so ‖x_new − x‖₂ = ε before the box clip;
        η is two pseudo-Gaussian bumps of opposite sign side by side (eq. 3 on each half:
        Σ_{k=d}^{n} (k+1)⁻², d the Chebyshev distance to the centre, n the largest), transposed
        at random; init: a tiling of ⌊min(H, W)/5⌋-sided squares of η with random signs, scaled
        to norm ε.
Side h_i = round(√(p_i·H·W)) (L∞: at least 1; L2: at least 3 and odd; at most min(H, W)),
p_i = p_init halved after iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000 of a
10 000-query run, i rescaled to n_queries (`rescale`; AutoAttack's standard run does not
rescale its 5 000 queries). p_init = 0.8 (AutoAttack's, for both norms).
Queries: `n_queries` bounds every forward pass of an example, the clean check (query 1) and
the initial point (query 2) included (the paper counts from the initial point: one fewer). An
example misclassified clean is returned as it is; one broken is never queried again. Returned:
the first misclassified point found, else the point of lowest margin.
Choices: as in the authors' code, an L∞ proposal that would leave the square unchanged draws
its signs again, and the L2 side is odd; window positions follow the paper (every position in
0 … H − h, which the authors' code stops one short of). Draws come from a torch.Generator seeded
with `seed` at each call, so a call is reproducible.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from .attack_base import Attack, check_int, check_norm, check_positive, clip_box, l2_norm, project

BREAKS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)  # p halves after these (of 10 000 queries)
REDRAWS = 16  # L∞: attempts at a proposal that changes the square


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """z_y − max_{k≠y} z_k per example: negative once misclassified."""
    return logits.gather(1, y[:, None]).squeeze(1) - logits.scatter(1, y[:, None], float("-inf")).amax(1)


def p_schedule(i: int, n_queries: int, p_init: float, rescale: bool = True) -> float:
    """p at iteration i (0-based, after the initial point): p_init halved once per breakpoint passed."""
    j = i * 10_000 // n_queries if rescale else i
    return p_init / 2 ** sum(j > b for b in BREAKS)


def pseudo_gaussian(a: int, b: int) -> torch.Tensor:
    """The bump of eq. 3 on an a × b rectangle: Σ_{k=d}^{n} (k+1)⁻², d the Chebyshev distance to
    the centre (a//2, b//2), n = max(a//2, b//2); unnormalised."""
    d = torch.maximum((torch.arange(a) - a // 2).abs()[:, None], (torch.arange(b) - b // 2).abs()[None, :])
    w = 1.0 / torch.arange(1, max(a // 2, b // 2) + 2, dtype=torch.float64) ** 2
    return w.flip(0).cumsum(0).flip(0)[d]


def l2_window(h: int) -> torch.Tensor:
    """η on an h × h square: the bump on the top ⌊h/2⌋ rows, minus the bump on the rest; unit norm."""
    eta = torch.cat([pseudo_gaussian(h // 2, h), -pseudo_gaussian(h - h // 2, h)])
    return eta / eta.norm()


def _signs(shape: tuple[int, ...], g: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    return torch.randint(0, 2, shape, generator=g, device=like.device).to(like.dtype) * 2 - 1


def _windows(n: int, h: int, size: tuple[int, int], g: torch.Generator, device: torch.device) -> torch.Tensor:
    """Row and column indices [n, h] of n uniformly placed h × h squares (positions 0 … H − h)."""
    r = torch.randint(0, size[0] - h + 1, (n, 1), generator=g, device=device)
    c = torch.randint(0, size[1] - h + 1, (n, 1), generator=g, device=device)
    step = torch.arange(h, device=device)
    return torch.stack([r + step, c + step])


def _paint(values: torch.Tensor, idx: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[n, 1, H, W]: zero, with values [n, h, h] in the squares idx (from _windows)."""
    n = values.shape[0]
    out = values.new_zeros(n, *size)
    out[torch.arange(n, device=values.device)[:, None, None], idx[0][:, :, None], idx[1][:, None, :]] = values
    return out[:, None]


def _random_eta(n: int, h: int, g: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """[n, h, h]: η, transposed for a random half of the examples."""
    eta = l2_window(h).to(like)
    flip = torch.rand(n, 1, 1, generator=g, device=like.device) < 0.5
    return torch.where(flip, eta.T, eta)


class Square(Attack):
    """Square Attack (Andriushchenko et al. 2020, alg. 1-3): gradient-free random search on the
    logit margin, each query changing one random h × h square; AutoAttack's black-box member.

    eps (8/255), norm ("linf" or "l2"), n_queries (5000, every forward pass of an example, the
    clean check included), p_init (0.8, the first square's share of the image), seed (0, of
    its own torch.Generator: a call is reproducible), rescale (True: the p schedule stretched
    to n_queries; False: AutoAttack's), eval_mode (True), check_range (True: check x ∈ [0, 1],
    the labels < K; a host sync each). x: images [N, C, H, W]."""

    def __init__(
        self,
        eps: float = 8 / 255,
        norm: str = "linf",
        n_queries: int = 5000,
        p_init: float = 0.8,
        seed: int = 0,
        rescale: bool = True,
        eval_mode: bool = True,
        check_range: bool = True,
    ):
        eps = check_positive("eps", eps)
        check_norm(norm)
        n_queries = check_int("n_queries", n_queries)
        if not isinstance(p_init, numbers.Real) or isinstance(p_init, bool) or not 0 < p_init <= 1:
            raise ValueError(f"p_init: must lie in (0, 1], got {p_init!r}")
        seed = check_int("seed", seed, minimum=0)
        self.eps, self.norm, self.n_queries, self.p_init = eps, norm, n_queries, float(p_init)
        self.seed, self.rescale, self.eval_mode, self.check_range = seed, rescale, eval_mode, check_range

    def _side(self, p: float, size: tuple[int, int]) -> int:
        side = min(size)
        h = round(math.sqrt(p * size[0] * size[1]))
        if self.norm == "linf":
            return min(max(h, 1), side)
        h = max(h, 3)
        h += 1 - h % 2  # odd
        return h if h <= side else side

    def _init(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        n, c, H, W = x.shape
        if self.norm == "linf":  # vertical stripes
            return (x + self.eps * _signs((n, c, 1, W), g, x)).clamp(0.0, 1.0)
        s = max(min(H, W) // 5, 1)
        delta = torch.zeros_like(x)
        r0, c0 = (H - H // s * s) // 2, (W - W // s * s) // 2
        for r in range(r0, r0 + H // s * s, s):
            for col in range(c0, c0 + W // s * s, s):
                tile = _random_eta(n, s, g, x)[:, None] * _signs((n, c, 1, 1), g, x)
                delta[:, :, r : r + s, col : col + s] = tile
        delta = delta * (self.eps / l2_norm(delta).clamp_min(1e-12)).view(-1, 1, 1, 1)
        return x + clip_box(x, project(delta, self.eps, "l2"))

    def _propose_linf(self, x: torch.Tensor, xh: torch.Tensor, h: int, g: torch.Generator) -> torch.Tensor:
        n, c, H, W = x.shape
        ones = torch.ones(n, h, h, device=x.device, dtype=x.dtype)
        inside = _paint(ones, _windows(n, h, (H, W), g, x.device), (H, W)).bool()
        signs = _signs((n, c, 1, 1), g, x)
        x_new = torch.where(inside, (x + self.eps * signs).clamp(0.0, 1.0), xh)
        for _ in range(REDRAWS):
            same = (x_new == xh).flatten(1).all(1)
            if not same.any():
                break
            signs = torch.where(same.view(-1, 1, 1, 1), _signs((n, c, 1, 1), g, x), signs)
            x_new = torch.where(inside, (x + self.eps * signs).clamp(0.0, 1.0), xh)
        return x_new

    def _propose_l2(self, x: torch.Tensor, xh: torch.Tensor, h: int, g: torch.Generator) -> torch.Tensor:
        n, c, H, W = x.shape
        nu = xh - x
        ones = torch.ones(n, h, h, device=x.device, dtype=x.dtype)
        idx1 = _windows(n, h, (H, W), g, x.device)
        w1 = _paint(ones, idx1, (H, W))
        w12 = torch.maximum(w1, _paint(ones, _windows(n, h, (H, W), g, x.device), (H, W)))
        channel_norm = lambda t: t.pow(2).sum((2, 3), keepdim=True).sqrt()  # noqa: E731
        unused = (self.eps**2 - l2_norm(nu).pow(2)).clamp_min(0.0).view(-1, 1, 1, 1)
        eta = _paint(_random_eta(n, h, g, x), idx1, (H, W)) * _signs((n, c, 1, 1), g, x)
        new = eta + nu * w1 / channel_norm(nu * w1).clamp_min(1e-12)
        avail = (channel_norm(nu * w12).pow(2) + unused / c).sqrt()
        nu = nu * (1 - w12) + new * avail / channel_norm(new).clamp_min(1e-12)
        return x + clip_box(x, project(nu, self.eps, "l2"))

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"x: the square attack needs images [N, C, H, W], got shape {tuple(x.shape)}")
        g = torch.Generator(device=x.device).manual_seed(self.seed)
        size = (x.shape[2], x.shape[3])
        propose = self._propose_linf if self.norm == "linf" else self._propose_l2
        best = x.clone()
        with torch.no_grad():
            todo = (model(x).argmax(1) == y).nonzero().squeeze(1)  # query 1: the clean check
            if self.n_queries < 2 or todo.numel() == 0:
                return best
            xs, ys = x[todo], y[todo]
            xh = self._init(xs, g)
            logits = model(xh)  # query 2: the initial point
            loss, fooled = margin(logits, ys), logits.argmax(1) != ys
            for i in range(self.n_queries - 2):
                active = (~fooled).nonzero().squeeze(1)
                if active.numel() == 0:
                    break
                h = self._side(p_schedule(i, self.n_queries, self.p_init, self.rescale), size)
                x_new = propose(xs[active], xh[active], h, g)
                logits = model(x_new)
                l_new, f_new = margin(logits, ys[active]), logits.argmax(1) != ys[active]
                take = (l_new < loss[active]) | f_new
                idx = active[take]
                xh[idx], loss[idx], fooled[idx] = x_new[take], l_new[take], f_new[take]
        best[todo] = xh
        return best
