"""The experiment schema: one typed, validated config for data, search space, algorithm,
optimisers, epochs, seed, device, storage and monitoring. Unknown keys are rejected; reading
a file, `--set` overrides and the one-line error messages are in config_file.py.
"""

from __future__ import annotations

import os
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from search_spaces import PRIMITIVES

from .distributed.schema import StrictModel, TuneConfig  # the typed `tune:` section (pure pydantic, no ray)
from .errors import UsageError


class Strict(StrictModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class SyntheticConfig(Strict):
    n: int = Field(512, gt=0)
    channels: int = Field(1, gt=0)
    image_size: int = Field(16, ge=4)
    num_classes: int = Field(4, ge=2)
    noise: float = Field(0.15, ge=0)


def local_path(path: str) -> str:
    """A local path made absolute (~ expanded), a URI as it is: a run resumed or evaluated from
    another folder, and Ray Tune's trials (each in a folder of its own), find the same files."""
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


IMAGE_SIDE = {"mnist5k": 28, "digits": 8, "mnist": 28, "fashion_mnist": 28, "cifar10": 32, "cifar100": 32, "svhn": 32}


class DataConfig(Strict):
    name: Literal["mnist5k", "digits", "synthetic", "mnist", "fashion_mnist", "cifar10", "cifar100", "svhn", "npz"] = (
        "mnist5k"
    )
    root: str = Field("data", description="folder of the torchvision data sets", validate_default=True)
    path: str | None = Field(None, description="name npz: the .npz file's path or URI (see distsearch/data_npz.py)")
    download: bool = False
    train_portion: float = Field(0.5, gt=0, lt=1)
    batch_size: int = Field(64, gt=0)
    eval_batch_size: int = Field(256, gt=0)
    test_fraction: float = Field(0.2, gt=0, lt=1)
    subset: int | None = Field(None, gt=0, description="use only the first N training examples")
    augment: bool = False
    cutout: int = Field(
        0, ge=0, description="training images: zero a random square of this side (Cutout; DARTS retraining: 16)"
    )
    synthetic: SyntheticConfig = SyntheticConfig()

    @model_validator(mode="after")
    def _consistent(self) -> DataConfig:
        if self.name == "npz" and not self.path:
            raise ValueError(
                "data.name npz reads a .npz file; set data.path to its path or URI (distsearch/data_npz.py)"
            )
        if self.name != "npz" and self.path:
            raise ValueError(f"only data.name npz reads data.path (name is {self.name}); remove data.path")
        if self.cutout == 1:
            raise ValueError(
                "data.cutout: 1 zeroes nothing (a square of side length // 2 * 2); use 0 (off) or 2 or more"
            )
        side = self.synthetic.image_size if self.name == "synthetic" else IMAGE_SIDE.get(self.name)
        if side and self.cutout > side:  # npz: when its images are read (data.BatchStream)
            raise ValueError(
                f"data.cutout: {self.cutout} is larger than {self.name}'s {side}x{side} images; at most {side}"
            )
        return self

    @field_validator("root", "path")
    @classmethod
    def _absolute(cls, path: str | None) -> str | None:
        return local_path(path) if path else path


class SpaceConfig(Strict):
    C: int = Field(16, gt=0, description="initial channels")
    layers: int = Field(8, gt=0, description="number of cells")
    nodes: int = Field(4, gt=0, description="intermediate nodes per cell")
    stem_multiplier: int = Field(3, gt=0)
    ops: list[str] = list(PRIMITIVES)

    @field_validator("ops")
    @classmethod
    def _ops_known(cls, ops: list[str]) -> list[str]:
        bad = [o for o in ops if o not in PRIMITIVES]
        if bad:
            raise ValueError(f"unknown op(s) {bad}; allowed: {', '.join(PRIMITIVES)}")
        if not [o for o in ops if o != "none"] or len(set(ops)) != len(ops):
            raise ValueError("ops must be distinct and contain at least one op other than 'none'")
        return ops


class OptimConfig(Strict):
    w_lr: float = Field(0.025, gt=0)
    w_lr_min: float = Field(0.001, ge=0)
    w_momentum: float = Field(0.9, ge=0, lt=1)
    w_weight_decay: float = Field(3e-4, ge=0)
    grad_clip: float = Field(5.0, gt=0, description="weight-gradient norm clip (the SGD step, plain or weight_at's)")
    arch_lr: float = Field(3e-4, gt=0)
    arch_betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.5, 0.999)
    arch_weight_decay: float = Field(1e-3, ge=0)


def _one_of(name: str, names: Any, what: str) -> str:
    """`name` if it is one of a registry's `names`, else the error naming them (a field validator's)."""
    if name not in names:
        raise ValueError(f"unknown {what} {name!r}; choose one of {', '.join(names)}")
    return name


class WeightATConfig(Strict):
    """An adversarial-training strategy (robust/training.py): for the search's weight step
    (`weight_at`) or for retraining (`TrainConfig.strategy`). `eps` None: the strategy's default."""

    strategy: str = "standard"
    eps: float | None = Field(None, ge=0)
    kwargs: dict[str, Any] = {}

    def build(self) -> Any:
        from .robust.training import make_strategy

        # standard ignores eps: an experiment sweeping weight_at.strategy shares one eps across strategies
        kw = dict(self.kwargs) | ({"eps": self.eps} if self.eps is not None and self.strategy != "standard" else {})
        try:
            return make_strategy(self.strategy, **kw)
        except (ValueError, TypeError) as e:
            raise UsageError(f"strategy: {e}") from None

    @field_validator("strategy")
    @classmethod
    def _known(cls, name: str) -> str:
        from .robust.training import STRATEGIES

        return _one_of(name, STRATEGIES, "name")

    @model_validator(mode="after")
    def _buildable(self) -> WeightATConfig:
        try:
            self.build()  # unknown options fail when the file is read
        except UsageError as e:
            raise ValueError(str(e).removeprefix("strategy: ")) from None
        return self


def _fd_r() -> Any:
    return Field(0.01, gt=0, description="finite-difference step of the Hessian-vector products (DARTS r)")


def _fd_replay() -> Any:
    return Field(
        True,
        description="the Hessian-vector products' moved weights replay the ReLU/max-pool choices of w (exact to "
        "O(r^2)); false: plain differences, as the reference DARTS code (O(1/r) off at kinks)",
    )


class DartsConfig(Strict):
    name: Literal["darts"] = "darts"
    order: Literal["first", "second"] = "first"
    fd_r: float = _fd_r()
    fd_replay: bool = _fd_replay()


class LeaseConfig(Strict):
    name: Literal["lease"] = "lease"
    order: Literal["first", "second"] = "first"
    gamma: float = Field(1.0, ge=0)
    audience: str = Field("small_cnn", description="small_cnn | mlp | resnet18 | resnet34 | resnet50")
    objective: Literal["prediction", "label"] = "prediction"
    weighting: Literal["delta", "abs_delta", "abs_delta_plus_one"] = "delta"
    eps: float = Field(8 / 255, ge=0)
    attack_steps: int = Field(7, ge=1)
    attack_step_size: float = Field(2 / 255, gt=0)
    norm: Literal["linf", "l2"] = "linf"
    first_order: bool = True
    audience_lr: float = Field(0.025, gt=0)
    disjoint_data: bool = False
    fresh_explanations: bool = Field(
        False, description="stage 3 on a second attack at the updated weights (default: the hypergradient's delta)"
    )
    fd_r: float = _fd_r()
    fd_replay: bool = _fd_replay()

    @field_validator("audience")
    @classmethod
    def _known_audience(cls, name: str) -> str:
        from .robust.models import MODELS

        return _one_of(name, MODELS, "model")


class DsrnaConfig(Strict):
    name: Literal["dsrna"] = "dsrna"
    order: Literal["first", "second"] = "first"
    variant: Literal["jacobian", "certified", "combined"] = "jacobian"
    gamma: float = Field(0.01, ge=0)
    eps: float = Field(0.1, ge=0)
    norm: Literal["linf", "l2"] = "linf"
    bound: Literal["ibp", "crown"] = "ibp"
    projections: int = Field(0, ge=0, description="0 = exact Jacobian, else random projections")
    jacobian_fd_step: float = Field(
        0.0,
        ge=0,
        description="0 = Jacobian norms by double backward; > 0 (1.0 advised, fp32 only): by finite differences "
        "along their dual directions with the activation pattern frozen, same gradients (Danskin), no "
        "second-order graph",
    )
    bn_stats: Literal["batch", "running"] = Field(
        "running",
        description="BN statistics while computing R: the running ones (the eval network; finite bounds on "
        "deep supernets) or the clean val batch's (exploding interval widths: NaN on 8 cells; held constant in "
        "the arch gradient, a stop-gradient: search/dsrna.py)",
    )
    cb_scale: Literal["symlog", "linear"] = Field("symlog", description="R_cb = mean of symlog(margin) or margin")
    fd_r: float = _fd_r()
    fd_replay: bool = _fd_replay()
    robust_batch: int = Field(
        0,
        ge=0,
        description="R on the first N examples of each validation batch (a random subset: batches are "
        "shuffled), 0 = all; R's share of the step's work scales with N / data.batch_size",
    )


AlgorithmConfig = Annotated[DartsConfig | LeaseConfig | DsrnaConfig, Field(discriminator="name")]


class StorageConfig(Strict):
    uri: str = "runs/search"
    keep: int = Field(3, ge=1, description="checkpoints kept")
    every_n_steps: int = Field(0, ge=0, description="also checkpoint every N steps (0: epoch ends only)")


class MonitorConfig(Strict):
    tensorboard: bool = True
    images_every: int = Field(1, ge=1, description="epochs between image summaries")
    log_every: int = Field(10, ge=1, description="steps between scalar summaries")
    progress: bool = True


class RunConfig(Strict):
    """What a search and a training run share."""

    name: str = "search"
    seed: int = Field(0, ge=0, lt=2**32)
    epochs: int = Field(50, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    deterministic: bool = True
    threads: int | None = Field(None, gt=0, description="torch intra-op threads (None: torch default)")
    data: DataConfig = DataConfig()
    storage: StorageConfig = StorageConfig()
    monitor: MonitorConfig = MonitorConfig()


class ModelConfig(Strict):
    """The network to train: a genotype (file or search store URI) or a named model."""

    genotype: str | None = Field(None, description="genotype.json path/URI, or a search's storage URI")
    name: str | None = Field(None, description="small_cnn | mlp | resnet18 | resnet34 | resnet50")
    kwargs: dict[str, Any] = Field({}, description="options of the named model, e.g. {width: 32}")
    C: int = Field(16, gt=0)
    layers: int = Field(8, gt=0)
    drop_path_prob: float = Field(0.0, ge=0, lt=1)
    auxiliary_weight: float = Field(
        0.0, ge=0, description="a genotype's auxiliary head, its loss weighted by this (DARTS retraining: 0.4); 0: none"
    )

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if (self.genotype is None) == (self.name is None):
            raise ValueError("give exactly one of model.genotype (a genotype JSON) or model.name")
        return self


class TrainOptimConfig(Strict):
    lr: float = Field(0.025, gt=0)
    lr_min: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(3e-4, ge=0)
    grad_clip: float | None = Field(None, gt=0, description="clip the gradients' total norm (DARTS retraining: 5)")


class RobustEvalConfig(Strict):
    """Per-epoch robust accuracy: PGD at eps on the first `n` test images (0 disables). With an
    adversarial strategy (training, or a search's weight_at), eps and norm not given are the
    strategy's: robust accuracy is reported at the budget the network is trained for."""

    eps: float = Field(0.1, gt=0, allow_inf_nan=False)  # PGD needs a budget: n 0 turns it off
    norm: Literal["linf", "l2"] = "linf"
    steps: int = Field(20, ge=1)
    n: int = Field(256, ge=0)

    def at_budget_of(self, strategy: WeightATConfig | None) -> RobustEvalConfig:
        """This config with the strategy's eps and norm where they were not given."""
        if strategy is None or strategy.strategy == "standard":
            return self
        built = strategy.build()
        update = {k: getattr(built, k) for k in ("eps", "norm") if k not in self.model_fields_set and hasattr(built, k)}
        return self.model_copy(update=update) if update else self


class TrainConfig(RunConfig):
    name: str = "train"
    epochs: int = Field(10, gt=0)
    model: ModelConfig
    strategy: WeightATConfig = WeightATConfig()
    optim: TrainOptimConfig = TrainOptimConfig()
    eval: RobustEvalConfig = RobustEvalConfig()

    @model_validator(mode="after")
    def _auxiliary_head_trains(self) -> TrainConfig:
        if self.model.auxiliary_weight and self.model.name is not None:
            raise ValueError(
                "model.auxiliary_weight: only a genotype's network has an auxiliary head; remove it for model.name"
            )
        if self.model.auxiliary_weight and self.strategy.strategy != "standard":
            raise ValueError(
                "model.auxiliary_weight: the auxiliary head trains with strategy standard only (DARTS's "
                f"retraining); set it to 0 for {self.strategy.strategy!r}"
            )
        return self

    @model_validator(mode="after")
    def _eval_at_training_budget(self) -> TrainConfig:
        if (at := self.eval.at_budget_of(self.strategy)) is not self.eval:
            self.eval = at  # validated again (validate_assignment), then unchanged
        return self


class SearchConfig(RunConfig):
    space: SpaceConfig = SpaceConfig()
    eval: RobustEvalConfig = Field(
        RobustEvalConfig(n=0),
        description="per-epoch PGD accuracy on the first n D_val images (val/robust_acc, right on x and "
        "under attack; val/robust_clean_acc: their clean accuracy)",
    )
    algorithm: AlgorithmConfig = DartsConfig()
    optim: OptimConfig = OptimConfig()
    weight_at: WeightATConfig | None = None
    precision: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="bf16: each search step under bf16 autocast (parameters, optimisers and the per-epoch "
        "evaluation stay fp32)",
    )
    channels_last: bool = Field(False, description="supernet and batches in channels_last memory format")
    cuda_graph: bool = Field(
        False,
        description="replay each search step from one captured CUDA graph (device cuda; not with weight_at "
        "free); not yet measured on a GPU, see distsearch/search/graphed.py",
    )

    @field_validator("weight_at")
    @classmethod
    def _supernet_strategy(cls, w: WeightATConfig | None) -> WeightATConfig | None:
        if w is not None and w.strategy == "yopo":
            raise ValueError("yopo needs a model exposing first_layer / forward_rest; the supernet has none")
        return w

    @model_validator(mode="after")
    def _switches_compatible(self) -> SearchConfig:
        if self.cuda_graph and self.device == "cpu":
            raise ValueError("cuda_graph: needs device cuda or auto on a GPU machine, not cpu")
        fd = isinstance(self.algorithm, DsrnaConfig) and self.algorithm.jacobian_fd_step > 0
        if isinstance(self.algorithm, DsrnaConfig) and self.algorithm.robust_batch > self.data.batch_size:
            raise ValueError(
                f"algorithm.robust_batch: {self.algorithm.robust_batch} is more than data.batch_size "
                f"({self.data.batch_size}); use at most that, or 0 for the whole batch"
            )
        if self.precision == "bf16" and fd:
            raise ValueError("algorithm.jacobian_fd_step: finite differences need fp32; use precision: fp32")
        if self.cuda_graph and self.weight_at is not None and self.weight_at.strategy == "free":
            raise ValueError("cuda_graph: weight_at strategy free carries delta across steps; use cuda_graph: false")
        if (at := self.eval.at_budget_of(self.weight_at)) is not self.eval:
            self.eval = at  # validated again (validate_assignment), then unchanged
        return self

    tune: TuneConfig | None = Field(None, description="Ray Tune section (distsearch run): distributed/schema.py")

    @field_validator("tune")
    @classmethod
    def _tune_paths_exist(cls, tune: TuneConfig | None, info: ValidationInfo) -> TuneConfig | None:
        if tune is not None:  # every sampled key path and value must give a valid config
            tune.check_paths(
                {k: v.model_dump(mode="json") if isinstance(v, BaseModel) else v for k, v in info.data.items()}
            )
            if not tune.resources.gpu and (info.data.get("device") == "cuda" or info.data.get("cuda_graph")):
                what = "device is cuda" if info.data.get("device") == "cuda" else "cuda_graph is on"
                raise ValueError(
                    f"resources.gpu is 0, so Ray gives each trial no GPU, but {what}; give each trial a GPU "
                    "share (tune.resources.gpu: 1, or a fraction such as 0.5) or run on the CPU (device: auto)"
                )
        return tune
