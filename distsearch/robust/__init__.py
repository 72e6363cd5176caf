"""Adversarial robustness: attacks, adversarial-training strategies, bounds and certification,
evaluation tables. The public names below are imported on first use (importing this package
imports none of its modules: cheap, no Ray, no matplotlib), each from its module:

    attacks.py        FGSM, FGM, PGD; ATTACKS and make_attack(name, **kwargs), which builds any
                      attack here by name ("pgd", "apgd", "square", "fab-t", "cw", ...)
    attack_base.py    Attack, the base class (eval mode, ε-ball and box geometry)
    apgd.py           APGD, APGDT          square.py    Square
    fab.py            FAB, FABT            lbfgs_cw.py  LBFGS, CarliniWagnerL2
    training.py       STRATEGIES and make_strategy(name, **kwargs) (standard, fgsm, fgsm_rs, fgm,
                      pgd, free, yopo, freelb, trades)
    training_base.py  Strategy, the strategy interface, and fit (a training loop)
    bounds.py         spec_bounds, margin_lower_bound, certified_radius (IBP and CROWN)
    certify.py        certified_accuracy, mean_certified_radius, certify_table
    evaluate.py       game_table (clean and attacked accuracy per attack and budget)
    models.py         build_model (small_cnn, mlp, resnet18/34/50 for small inputs)
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, tuple[str, ...]] = {
    "attacks": ("ATTACKS", "FGM", "FGSM", "PGD", "make_attack"),
    "attack_base": ("Attack",),
    "apgd": ("APGD", "APGDT"),
    "square": ("Square",),
    "fab": ("FAB", "FABT"),
    "lbfgs_cw": ("LBFGS", "CarliniWagnerL2"),
    "training": ("STRATEGIES", "make_strategy"),
    "training_base": ("Strategy", "fit"),
    "bounds": ("certified_radius", "margin_lower_bound", "spec_bounds"),
    "certify": ("certified_accuracy", "certify_table", "mean_certified_radius"),
    "evaluate": ("game_table",),
    "models": ("build_model",),
}
_SOURCE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_SOURCE)


def __getattr__(name: str) -> Any:
    """A public name, imported from its module on first use (then cached here)."""
    module = _SOURCE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
