"""Sweep files: a typed, validated spec, expanded into trials before Ray starts.

A sweep names datasets, models with their losses and N values, seeds, settings for every
trial and per dataset, optional Optuna search blocks, resources per trial and where results
go. Any unknown key, wrong type or impossible value is refused as one line naming the file
and the key path (`sweeps/x.yaml: models[1].negatives: ...`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from raysweep.config import TrialConfig, trial_key
from raysweep.data import get_dataset
from raysweep.errors import UserError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Distribution(Strict):
    """One searched parameter: exactly one of these, mapped onto Tune's search space."""

    choice: list[int | float | str] | None = Field(None, min_length=1)
    uniform: list[float] | None = Field(None, min_length=2, max_length=2)  # [low, high]
    loguniform: list[float] | None = Field(None, min_length=2, max_length=2)
    randint: list[int] | None = Field(None, min_length=2, max_length=2)  # high exclusive (Tune's convention)

    @model_validator(mode="after")
    def _exactly_one(self) -> Distribution:
        given = [k for k, v in self.__dict__.items() if v is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of choice, uniform, loguniform, randint (got {given or 'none'})")
        for kind in ("uniform", "loguniform", "randint"):
            bounds = getattr(self, kind)
            if bounds is not None and not bounds[0] < bounds[1]:
                raise ValueError(f"{kind} needs low < high, got {list(bounds)}")
            if kind == "loguniform" and bounds is not None and bounds[0] <= 0:
                raise ValueError("loguniform needs low > 0")
        return self


class Search(Strict):
    """An Optuna search (Tune's OptunaSearch), optimising the best validation NDCG@10."""

    samples: int = Field(gt=0)
    seed: int = 0
    max_concurrent: int | None = Field(None, gt=0)
    space: dict[str, Distribution] = Field(min_length=1)


class ModelEntry(Strict):
    model: Literal["sasrec", "bert4rec", "gru4rec", "bpr"]
    loss: Literal["bce", "ce", "sampled_ce"] | None = None
    negatives: list[int] | int | None = None
    datasets: list[str] | None = None  # only these of the sweep's datasets (e.g. N beyond a small catalogue)
    settings: dict[str, Any] = {}
    search: Search | None = None

    @model_validator(mode="after")
    def _one_n_per_search(self) -> ModelEntry:
        if self.search is not None and isinstance(self.negatives, list) and len(self.negatives) > 1:
            raise ValueError("a searched entry takes one N; give each N its own entry")
        return self


class Resources(Strict):
    cpus: float = Field(1.0, gt=0)
    gpus: float = Field(0.0, ge=0, le=1)  # a fraction lets several small trials share a card


class SweepSpec(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    datasets: list[str] = Field(min_length=1)
    models: list[ModelEntry] = Field(min_length=1)
    seeds: list[int] = Field([0], min_length=1)
    settings: dict[str, Any] = {}  # every trial (budget: max_epochs, patience, val_users, ...)
    overrides: dict[str, dict[str, Any]] = {}  # per dataset (max_len, hidden, ...)
    resources: Resources = Resources()
    max_retries: int = Field(2, ge=0)  # a failing trial is retried from its last checkpoint
    results: str | None = None  # run directory; default runs/<name>


@dataclass(frozen=True)
class Trial:
    config: TrialConfig
    stage: str  # "seeds", or "search:<dataset>:<entry>"
    key: str  # stable id: the same settings give the same key (resume, deduplication)


def _error_path(loc: tuple) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def load_spec(path: Path) -> SweepSpec:
    """Read and validate a sweep file (safe YAML only)."""
    where = str(path)
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise UserError(f"{where}: cannot read sweep file ({exc.strerror})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f", line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"{where}{line}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{where}: a sweep file is a YAML mapping (name, datasets, models, ...)")
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise UserError(f"{where}: {_error_path(first['loc']) or 'sweep'}: {first['msg']}") from None
    _check_settings(spec, where)
    return spec


def _check_settings(spec: SweepSpec, where: str) -> None:
    for name in spec.datasets:
        try:
            get_dataset(name)
        except UserError as exc:
            raise UserError(f"{where}: datasets: {exc}") from None
    for name in spec.overrides:
        if name not in spec.datasets:
            raise UserError(f"{where}: overrides.{name}: not one of the sweep's datasets {spec.datasets}")
    TrialConfig.check_keys(spec.settings, f"{where}: settings")
    for name, values in spec.overrides.items():
        TrialConfig.check_keys(values, f"{where}: overrides.{name}")
    for i, entry in enumerate(spec.models):
        TrialConfig.check_keys(entry.settings, f"{where}: models[{i}].settings")
        for name in entry.datasets or []:
            if name not in spec.datasets:
                raise UserError(f"{where}: models[{i}].datasets: {name!r} is not one of the sweep's datasets")
        if entry.search is not None:
            TrialConfig.check_keys({k: None for k in entry.search.space}, f"{where}: models[{i}].search.space")


def entry_trials(spec: SweepSpec, index: int, dataset: str, seed: int, where: str,
                 searched: dict[str, Any] | None = None) -> list[TrialConfig]:
    """The trials of one model entry on one dataset and seed: one per N."""
    entry = spec.models[index]
    negatives = entry.negatives if isinstance(entry.negatives, list) else [entry.negatives]
    out = []
    for n in negatives:
        values = {"dataset": dataset, "model": entry.model, "loss": entry.loss, "negatives": n, "seed": seed,
                  **spec.settings, **spec.overrides.get(dataset, {}), **entry.settings, **(searched or {})}
        out.append(TrialConfig.from_dict(values, f"{where}: models[{index}] on {dataset}"))
    return out


def expand(spec: SweepSpec, where: str = "sweep") -> list[Trial]:
    """Every trial of the sweep. Searched entries contribute their search's first trial
    shape only (the search stage samples the rest; the seeds stage uses its best setting)."""
    trials = []
    for dataset in spec.datasets:
        for i, entry in enumerate(spec.models):
            if entry.datasets is not None and dataset not in entry.datasets:
                continue
            stage = "seeds" if entry.search is None else f"search-{dataset}-{i}"  # run._run_stages uses the same name
            for seed in spec.seeds if entry.search is None else [spec.seeds[0]]:
                for cfg in entry_trials(spec, i, dataset, seed, where):
                    trials.append(Trial(cfg, stage, trial_key(cfg)))
    keys = [t.key for t in trials]
    duplicated = {k for k in keys if keys.count(k) > 1}
    if duplicated:
        raise UserError(f"{where}: the same trial appears twice ({sorted(duplicated)[0]}); remove the repeated entry")
    return trials
