"""The typed `tune:` section of an experiment file (no ray import here).

    tune:
      search_alg: optuna          # optuna | random
      sampler: tpe                # tpe | nsga2 (multi-objective over `metrics`)
      scheduler: asha             # asha | pbt | fifo
      metric: val/acc             # single objective (tpe, asha, pbt)
      mode: max
      metrics: [val/acc, val/robust_acc]  # nsga2 only, with `modes` (val/robust_acc needs eval.n > 0)
      num_samples: 2
      max_concurrent_trials: 2
      resources: {cpu: 1, gpu: 0.5}
      storage: runs               # local path, file://, s3://bucket/prefix, gs://bucket/prefix
      params:                     # any dotted key of the search config
        algorithm.name: {choice: [darts, lease]}
        optim.arch_lr: {loguniform: [1.0e-4, 1.0e-2]}
        weight_at.eps: {uniform: [0.05, 0.3]}

Every sampled key path and every candidate value (choices, grid values, range ends) is
checked against SearchConfig when the file is loaded, so a typo fails before Ray starts.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

KINDS = ("choice", "grid", "uniform", "loguniform")
# What every search reports each epoch (runner.run_search; val/robust_* with eval.n > 0); the
# searcher's step values arrive as train/<key> and its learning rates as lr/<group>.
METRICS = ("val/acc", "val/loss", "test/acc", "test/loss", "val/robust_acc", "val/robust_clean_acc", "time/epoch_s")
# The step values each searcher reports (search/darts.py, dsrna.py, lease.py; dsrna's R terms by
# variant), those a weight_at strategy other than standard adds (its pass counts, trades' clean
# accuracy: robust/training*.py), and each searcher's learning rates (Searcher.learning_rates).
_DARTS_STEP = "train_loss train_acc val_loss val_acc arch_nonfinite"
ALGORITHM_STEP = {
    "darts": _DARTS_STEP.split(),
    "dsrna": f"{_DARTS_STEP} arch_objective R".split(),
    "lease": (
        "train_loss train_acc val_loss val_acc arch_objective attack_loss attack_success audience_train_loss "
        "audience_train_acc audience_val_loss audience_val_acc audience_clean_acc"
    ).split(),
}
DSRNA_VARIANT_STEP = {"jacobian": ["R_jac"], "certified": ["R_cb"], "combined": ["R_jac", "R_cb"]}
WEIGHT_AT_STEP = ["train_forward_passes", "train_backward_passes"]
STRATEGY_STEP = {"trades": ["train_clean_acc"]}
LEARNING_RATES = {"darts": ["weights", "arch"], "dsrna": ["weights", "arch"], "lease": ["weights", "arch", "audience"]}
# (the config keys they depend on, each as sampled by `tune.params`)
STEP_KEYS = ("algorithm", "algorithm.name", "algorithm.variant", "weight_at", "weight_at.strategy")


def step_metrics(raw: dict[str, Any]) -> list[str]:
    """The train/<key> and lr/<group> names a search with the raw config `raw` reports."""
    algorithm = raw.get("algorithm") or {}
    name = algorithm.get("name", "darts")
    keys = list(ALGORITHM_STEP.get(name, []))
    if name == "dsrna":
        keys += DSRNA_VARIANT_STEP.get(algorithm.get("variant", "jacobian"), [])
    strategy = (raw.get("weight_at") or {"strategy": None}).get("strategy", "standard")
    if strategy not in (None, "standard"):  # the runner's weight step is plain for these
        keys += WEIGHT_AT_STEP + STRATEGY_STEP.get(strategy, [])
    return [f"train/{k}" for k in keys] + [f"lr/{g}" for g in LEARNING_RATES.get(name, [])]


def _describe(raw: dict[str, Any]) -> str:
    """'algorithm dsrna (variant combined, weight_at fgsm)': what step_metrics(raw) depends on."""
    algorithm, at = raw.get("algorithm") or {}, raw.get("weight_at") or {}
    name = algorithm.get("name", "darts")
    extra = [f"variant {algorithm.get('variant', 'jacobian')}"] if name == "dsrna" else []
    extra += [f"weight_at {at.get('strategy', 'standard')}"] if at.get("strategy", "standard") != "standard" else []
    return f"algorithm {name}" + (f" ({', '.join(extra)})" if extra else "")


# every step value and learning rate some search reports (the name check before the config's)
STEP_METRICS = tuple(
    dict.fromkeys(
        [f"train/{k}" for keys in ALGORITHM_STEP.values() for k in keys]
        + [f"train/{k}" for keys in DSRNA_VARIANT_STEP.values() for k in keys]
        + [f"train/{k}" for k in WEIGHT_AT_STEP]
        + [f"train/{k}" for keys in STRATEGY_STEP.values() for k in keys]
        + [f"lr/{g}" for groups in LEARNING_RATES.values() for g in groups]
    )
)


class StrictModel(BaseModel):
    """Unknown keys, inf/nan and true/false for a number are refused (pydantic would read
    `epochs: true` as 1)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, raw: Any) -> Any:
        if not isinstance(raw, dict):
            return raw
        out = dict(raw)
        for key, value in raw.items():
            field = cls.model_fields.get(key) if isinstance(value, bool) else None
            kinds = (get_args(field.annotation) or (field.annotation,)) if field else ()
            if bool not in kinds and (int in kinds or float in kinds):
                out[key] = str(value).lower()  # pydantic's own error then names the field: not a number
        return out


class ParamSpec(StrictModel):
    """One sampled key: exactly one of choice/grid (a list) or uniform/loguniform ([low, high])."""

    choice: list[Any] | None = None
    grid: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> ParamSpec:
        given = [k for k in KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(KINDS)} (got {given or 'none'})")
        kind = given[0]
        if kind in ("choice", "grid") and not getattr(self, kind):
            raise ValueError(f"{kind}: needs at least one value")
        if kind in ("uniform", "loguniform"):
            lo, hi = getattr(self, kind)
            if not lo < hi:
                raise ValueError(f"{kind}: needs low < high (got [{lo}, {hi}])")
            if kind == "loguniform" and lo <= 0:
                raise ValueError(f"loguniform: needs low > 0 (got {lo})")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) is not None)

    @property
    def candidates(self) -> list[Any]:
        """Values to check against the config schema: every listed value, or both range ends and
        a value inside (so a range over an integer field fails here, not in every trial)."""
        if self.kind in ("choice", "grid"):
            return list(getattr(self, self.kind))
        lo, hi = getattr(self, self.kind)
        inside = lo + 0.382 * (hi - lo) if self.kind == "uniform" else lo * (hi / lo) ** 0.382
        return [lo, inside, hi]

    def contains(self, value: Any) -> bool:
        if self.kind in ("choice", "grid"):
            return value in getattr(self, self.kind)
        lo, hi = getattr(self, self.kind)
        return isinstance(value, (int, float)) and not isinstance(value, bool) and lo <= value <= hi


class Resources(StrictModel):
    cpu: float = Field(1, gt=0, description="CPUs per trial (also its torch / OMP threads)")
    gpu: float = Field(
        0, ge=0, description="GPU share per trial: 0 (the trial runs on the CPU), a fraction such as 0.25, or 1"
    )

    @field_validator("gpu")
    @classmethod
    def _at_most_one(cls, gpu: float) -> float:
        if gpu > 1:
            raise ValueError("a trial holds one supernet on at most one GPU: use a fraction in (0, 1]")
        return gpu


class TuneConfig(StrictModel):
    search_alg: Literal["optuna", "random"] = "optuna"
    sampler: Literal["tpe", "nsga2"] = "tpe"
    scheduler: Literal["asha", "pbt", "fifo"] = "fifo"
    metric: str = "val/acc"
    mode: Literal["max", "min"] = "max"
    metrics: list[str] | None = Field(None, description="nsga2: the objectives, e.g. [val/acc, test/acc]")
    modes: list[Literal["max", "min"]] | None = None
    num_samples: int = Field(1, gt=0)
    max_concurrent_trials: int | None = Field(None, gt=0)
    resources: Resources = Resources()
    storage: str = Field("runs", min_length=1, description="storage URI for all trials of the experiment")
    params: dict[str, ParamSpec]
    points_to_evaluate: list[dict[str, Any]] | None = Field(None, description="configs to try first (optuna)")
    grace_period: int = Field(1, gt=0, description="asha: epochs before a trial can be stopped")
    reduction_factor: float = Field(2, gt=1)
    perturbation_interval: int = Field(1, gt=0, description="pbt: epochs between exploit/explore")
    quantile_fraction: float = Field(0.25, gt=0, le=0.5, description="pbt: bottom share that exploits the top share")
    synch: bool = Field(False, description="pbt: wait at each perturbation point until every trial has reported")
    reuse_actors: bool = Field(
        True, description="a new trial may reuse a finished trial's worker process (never under pbt)"
    )
    max_failures: int = Field(0, ge=0, description="retries of a failed trial (from its last checkpoint)")
    seed: int | None = Field(None, description="search algorithm seed (default: the config's seed)")

    @field_validator("params")
    @classmethod
    def _not_empty(cls, params: dict[str, ParamSpec]) -> dict[str, ParamSpec]:
        if not params:
            raise ValueError("empty param space: sample at least one key, e.g. algorithm.name: {choice: [darts]}")
        return params

    @model_validator(mode="after")
    def _consistent(self) -> TuneConfig:
        grid = [k for k, p in self.params.items() if p.kind == "grid"]
        if grid and self.search_alg != "random":
            raise ValueError(f"params {grid}: grid needs search_alg: random (Optuna samples; use choice)")
        if self.scheduler == "pbt" and self.search_alg != "random":
            raise ValueError("scheduler pbt mutates configs itself: use search_alg: random")
        if self.sampler == "nsga2":
            if self.search_alg != "optuna":
                raise ValueError("sampler nsga2 needs search_alg: optuna")
            if not self.metrics or len(self.metrics) < 2 or len(self.modes or []) != len(self.metrics):
                raise ValueError("sampler nsga2 needs two or more `metrics` and one `modes` entry (max|min) each")
        elif self.metrics is not None:
            raise ValueError("`metrics` (several objectives) needs sampler: nsga2; use `metric` otherwise")
        for metric, _ in self.objectives:
            if metric not in METRICS + STEP_METRICS:
                raise ValueError(
                    f"metric {metric!r} is not reported by a search: use one of {', '.join(METRICS)}, "
                    f"or a step value or learning rate ({', '.join(STEP_METRICS)}; some only by one algorithm)"
                )
        for point in self.points_to_evaluate or []:
            unknown = sorted(set(point) - set(self.params))
            if unknown:
                raise ValueError(f"points_to_evaluate: keys {unknown} are not in params")
            for key, value in point.items():
                spec = self.params[key]
                if not spec.contains(value):
                    raise ValueError(
                        f"points_to_evaluate: {key} = {value!r} is outside its {spec.kind} {getattr(spec, spec.kind)}"
                    )
        return self

    @property
    def objectives(self) -> list[tuple[str, str]]:
        if self.metrics:
            return list(zip(self.metrics, self.modes or []))
        return [(self.metric, self.mode)]

    def check_paths(self, base: dict[str, Any]) -> None:
        """Validate every candidate value of every sampled key against SearchConfig."""
        from pydantic import ValidationError

        from ..config import SearchConfig
        from ..config_file import format_validation_error

        robust = [m for m, _ in self.objectives if m.startswith("val/robust")]
        n_eval = self.params.get("eval.n")
        if robust and not (base.get("eval") or {}).get("n") and not (n_eval and all(n_eval.candidates)):
            raise ValueError(
                f"metric {robust[0]!r} is reported only with eval.n > 0; set eval: {{n: 64}} in the config"
            )
        for key, spec in self.params.items():
            for value in spec.candidates:
                try:
                    raw = apply_params(base, {key: value})
                except KeyError as e:
                    raise ValueError(f"params '{key}': {e.args[0]}") from None
                try:
                    SearchConfig.model_validate(raw)
                except ValidationError as e:
                    msg = format_validation_error(e, prefix="").removeprefix(" error: ")
                    raise ValueError(f"params '{key}': {spec.kind} value {value!r}: {msg}") from None
        self._check_step_metrics(base)

    def _check_step_metrics(self, base: dict[str, Any]) -> None:
        """A train/ or lr/ objective must be reported by the configured algorithm (its variant and
        weight_at strategy), or by one of the sampled ones: search_trial reports NaN for it in the
        others (Tune needs it in every result)."""
        wanted = [m for m, _ in self.objectives if m.startswith(("train/", "lr/"))]
        if not wanted:
            return
        sampled = [k for k in STEP_KEYS if k in self.params]
        configs = [
            apply_params(base, dict(zip(sampled, values, strict=True)))
            for values in itertools.product(*(self.params[k].candidates for k in sampled))
        ]
        for metric in wanted:
            if any(metric in step_metrics(raw) for raw in configs):
                continue
            field = "metrics entry" if self.metrics else "metric"
            reports = dict.fromkeys(f"{_describe(r)} reports {', '.join(step_metrics(r))}" for r in configs)
            if len(reports) == 1:
                msg = f"{field} {metric!r} is not reported: {next(iter(reports))}"
            else:
                msg = f"{field} {metric!r} is not reported by any sampled configuration: {'; '.join(reports)}"
            raise ValueError(msg)


def apply_params(base: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """A copy of a raw config dict with `a.b.c: value` entries set (missing sections created)."""
    raw = copy.deepcopy(base)
    raw.pop("tune", None)
    for key, value in params.items():
        node = raw
        *parents, leaf = key.split(".")
        for p in parents:
            if node.get(p) is None:
                node[p] = {}
            if not isinstance(node[p], dict):
                raise KeyError(f"'{p}' is not a config section")
            node = node[p]
        node[leaf] = copy.deepcopy(value)
    return raw
