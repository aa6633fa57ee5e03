"""The sweep spec (``pipelines/sweeps/<name>.yaml``): its pydantic models, loading and checking, the Tune space."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sbir.config import ParamsError, flatten, load_params, read_yaml
from sbir.registry import STAGES
from sbir.tracking import REPO_ROOT


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ChoiceDim(_Spec):
    type: Literal["choice"]
    values: list[Any] = Field(min_length=1)


class GridDim(_Spec):
    type: Literal["grid"]
    values: list[Any] = Field(min_length=1)


class UniformDim(_Spec):
    type: Literal["uniform"]
    low: float
    high: float

    @model_validator(mode="after")
    def _order(self) -> "UniformDim":
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        return self


class LogUniformDim(UniformDim):
    type: Literal["loguniform"]  # type: ignore[assignment]

    @model_validator(mode="after")
    def _positive(self) -> "LogUniformDim":
        if self.low <= 0:
            raise ValueError(f"loguniform needs low > 0 (got {self.low})")
        return self


Dim = Union[ChoiceDim, GridDim, UniformDim, LogUniformDim]


class Objective(_Spec):
    metric: str = Field(description="a key the trial reports, e.g. val/crossx_dfl/mAP@all")
    mode: Literal["max", "min"] = "max"


class AshaSpec(_Spec):
    enabled: bool = True
    time_attr: str = "training_iteration"
    max_t: int = Field(1000, ge=1)
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2.0, gt=1)


class SweepSpec(_Spec):
    """One sweep: ``pipelines/sweeps/<name>.yaml``."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    params: str = Field("params.yaml", description="the params file trials start from (relative to the repo)")
    stages: list[str] = Field(min_length=1, description="stages each trial runs, in order")
    base_overrides: dict[str, Any] = Field(default_factory=dict, description="dotted key -> value for every trial")
    space: dict[str, Dim] = Field(min_length=1, description="dotted params key -> search dimension")
    validation: Literal["category", "fine_grained", "none"] = "category"
    validation_options: dict[str, Any] = Field(default_factory=dict)
    objective: Objective
    num_samples: int = Field(4, ge=1, description="samples of the space (each grid point num_samples times)")
    seed: int = Field(0, description="searcher seed: the same seed draws the same trial configs")
    asha: AshaSpec = AshaSpec()
    max_concurrent_trials: int = Field(2, ge=1)
    trial_resources: dict[str, float] = Field(default_factory=lambda: {"cpu": 0.01},
                                              description="the trial driver's own resources (workers ask for theirs)")

    @model_validator(mode="after")
    def _check(self) -> "SweepSpec":
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; known: {sorted(STAGES)}")
        needs = {"category": "distill", "fine_grained": "fgsbir_joint"}.get(self.validation)
        if needs and needs not in self.stages:
            raise ValueError(f"validation {self.validation!r} scores the {needs} stage's output, so stages must "
                             f"include {needs!r} (otherwise every trial would score the pipeline's own {needs})")
        both = set(self.space) & set(self.base_overrides)
        if both:
            raise ValueError(f"key(s) {sorted(both)} are both swept and in base_overrides")
        if "outputs_dir" in self.space or "outputs_dir" in self.base_overrides:
            raise ValueError("outputs_dir is set per trial by the sweep")
        if self.trial_resources.get("cpu", 0) <= 0:
            raise ValueError("trial_resources.cpu must be > 0 (Ray refuses an empty bundle; 0.01 is enough)")
        return self


class SweepError(ValueError):
    """A sweep spec or sweep folder is invalid; the message names the file and the problem."""


def load_spec(path: str | os.PathLike) -> SweepSpec:
    """Read and validate a sweep spec; also check every swept and base key against the params models."""
    path = Path(path)
    try:
        spec = SweepSpec.model_validate(read_yaml(path))
    except ParamsError as exc:
        raise SweepError(str(exc)) from None
    except ValidationError as exc:
        lines = [f"{path}: invalid sweep spec"]
        for err in exc.errors():
            lines.append(f"  {'.'.join(str(x) for x in err['loc']) or '<root>'}: {err['msg']}")
        raise SweepError("\n".join(lines)) from None
    # every key must exist in the params (validated values: one sample of each dimension)
    params_path = repo_path(spec.params)
    sample = {k: _sample_value(d) for k, d in spec.space.items()}
    try:
        load_params(params_path, {**spec.base_overrides, **sample})
    except ParamsError as exc:
        raise SweepError(f"{path}: the overrides do not fit {params_path}:\n{exc}") from None
    flat = flatten(read_yaml(params_path))
    unknown = [k for k in list(spec.space) + list(spec.base_overrides)
               if k not in flat and not any(f.startswith(k + ".") for f in flat)]
    if unknown:  # keys the models accept with defaults but the file lacks: allowed, named so typos show
        print(f"[sweep] note: {unknown} not in {params_path}; using the params models' validation only", flush=True)
    return spec


def _sample_value(d: Dim) -> Any:
    if isinstance(d, (ChoiceDim, GridDim)):
        return d.values[0]
    if isinstance(d, LogUniformDim):
        return math.sqrt(d.low * d.high)
    return (d.low + d.high) / 2


def repo_path(p: str | os.PathLike) -> Path:
    p = Path(p)
    return p if p.is_absolute() else (REPO_ROOT / p).resolve()


def param_space(spec: SweepSpec) -> dict[str, Any]:
    from ray import tune

    out: dict[str, Any] = {}
    for key, d in spec.space.items():
        if isinstance(d, ChoiceDim):
            out[key] = tune.choice(d.values)
        elif isinstance(d, GridDim):
            out[key] = tune.grid_search(d.values)
        elif isinstance(d, LogUniformDim):
            out[key] = tune.loguniform(d.low, d.high)
        else:
            out[key] = tune.uniform(d.low, d.high)
    return {"swept": out}



def format_override(key: str, value: Any) -> str:
    """``key=value`` with the value as compact YAML/JSON (no spaces: safe for ``$(cat file)``)."""
    return f"{key}={json.dumps(value, separators=(',', ':'))}"
