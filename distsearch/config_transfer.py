"""The `distsearch transfer` config (Szegedy et al. 2014, tables 2-4): the models trained, the
attack whose examples are carried between them, and the optional unit analysis. The shared
sections (data, storage, monitor) and the loader are config.py's and config_file.py's.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from .config import RunConfig, Strict


class TransferModel(Strict):
    label: str
    name: str = "small_cnn"
    kwargs: dict[str, Any] = {}
    half: Literal[0, 1] | None = Field(None, description="train on one half of the training set (disjoint halves)")
    seed: int = Field(0, ge=0, lt=2**32)
    epochs: int | None = Field(None, gt=0)


class AttackConfig(Strict):
    name: str = "fgsm"
    kwargs: dict[str, Any] = {"eps": 0.1}


class UnitsConfig(Strict):
    model: str = Field(..., description="label of the model to analyse")
    layer: str = Field(..., description="module name, e.g. rest.8 for small_cnn's hidden layer")
    k: int = Field(16, gt=0)


class TransferConfig(RunConfig):
    """Szegedy et al. 2014, tables 2-4: adversarial examples of each model against every other."""

    name: str = "transfer"
    epochs: int = Field(3, gt=0)
    lr: float = Field(0.05, gt=0)
    models: list[TransferModel] = Field(..., min_length=2)
    attack: AttackConfig = AttackConfig()
    n: int = Field(500, gt=0, description="test images attacked")
    units: UnitsConfig | None = None
