"""Sweep files: a typed, validated spec, expanded into trials before Ray starts.

A sweep names datasets, models with their losses and N values, seeds, settings for every
trial and per dataset, optional Optuna search blocks, resources per trial and where results
go. Any unknown key, wrong type or impossible value is refused as one line naming the file
and the key path (`sweeps/x.yaml: models[1].negatives: ...`).
"""

from __future__ import annotations

import itertools
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from raysweep.core.config import LOSSES, MODELS, TrialConfig, dataset_tag, trial_key
from raysweep.core.data import get_dataset
from raysweep.core.errors import UserError


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
            raise ValueError(
                f"give exactly one of choice, uniform, loguniform, randint (got {given or 'none'})"
            )
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
    model: Literal[MODELS]
    loss: Literal[LOSSES] | None = None
    negatives: list[int] | int | None = None
    datasets: list[str] | None = Field(
        None, min_length=1
    )  # only these of the sweep's datasets (e.g. N beyond a small catalogue)
    seeds: list[int] | None = Field(None, min_length=1)  # instead of the sweep's seeds, for this entry
    settings: dict[str, Any] = {}
    search: Search | None = None

    @model_validator(mode="after")
    def _one_n_per_search(self) -> ModelEntry:
        if self.search is not None and isinstance(self.negatives, list) and len(self.negatives) > 1:
            raise ValueError("a searched entry takes one N; give each N its own entry")
        return self


class Resources(Strict):
    cpus: float = Field(1.0, gt=0, allow_inf_nan=False)
    gpus: float = Field(
        0.0, ge=0, le=1, allow_inf_nan=False
    )  # a fraction lets several small trials share a card


class SweepSpec(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$", max_length=100)  # one plain path component
    description: str = ""
    datasets: list[str] = Field(min_length=1)
    models: list[ModelEntry] = Field(min_length=1)
    seeds: list[int] = Field([0], min_length=1)
    settings: dict[str, Any] = {}  # every trial (budget: max_epochs, patience, val_users, ...)
    overrides: dict[str, dict[str, Any]] = {}  # per dataset (max_len, hidden, ...)
    resources: Resources = Resources()
    max_retries: int = Field(2, ge=0)  # a failing trial is retried from its last saved state
    results: str | None = None  # run directory; default runs/<name>
    compare: list[list[str]] = []  # pairs of Table 2 models to compare over users, beside the paper's claims
    tracking: Literal["mlflow"] | None = None  # MLflow tracking (raysweep.tracking)

    @model_validator(mode="after")
    def _pairs(self) -> SweepSpec:
        for i, pair in enumerate(self.compare):
            if len(pair) != 2:
                raise ValueError(f"compare[{i}] must name two models, got {pair}")
        return self


@dataclass(frozen=True)
class Trial:
    config: TrialConfig
    stage: str  # "seeds", or a search stage (`stage_name`)
    key: str  # stable id: the same settings give the same key (resume, deduplication)


def _error_path(loc: tuple) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


class _Loader(yaml.SafeLoader):
    """Safe YAML that refuses a key given twice in one mapping (PyYAML keeps the last silently),
    takes merge keys (`<<: *base`), and reads `1e-3` as the number it is in YAML 1.2 (YAML 1.1,
    PyYAML's, wants `1.0e-3` and reads `1e-3` as a string)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # merged keys may be given again: the mapping's own value wins
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)?\.?[0-9]+[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)

# A sweep file is a few dozen values; YAML aliases can make a small file stand for billions.
MAX_VALUES = 100_000


def _count_values(document: Any) -> int:
    """How many values the document holds once its aliases are expanded, up to MAX_VALUES + 1."""
    count, stack = 0, [document]
    while stack and count <= MAX_VALUES:
        value = stack.pop()
        count += 1
        if isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return count


def load_spec(path: Path) -> SweepSpec:
    """Read and validate a sweep file (safe YAML only), with every path in it made absolute and
    every setting checked by the trial's config model."""
    spec = read_spec(path)
    spec = _absolute_paths(spec)
    _check_settings(spec, str(path))
    return spec


def read_spec(path: Path) -> SweepSpec:
    """A sweep file read and checked against the sweep schema alone (no data files looked at):
    what a report needs of a run's spec.yaml on any machine."""
    where = str(path)
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as exc:
        raise UserError(f"{where}: cannot read sweep file ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{where}: not a UTF-8 text file (byte {exc.start}: {exc.reason})") from None
    try:
        raw = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f", line {mark.line + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())  # (a reader error spans lines)
        raise UserError(f"{where}{line}: not valid YAML ({problem})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{where}: a sweep file is a YAML mapping (name, datasets, models, ...)")
    if _count_values(raw) > MAX_VALUES:
        raise UserError(f"{where}: the file expands to more than {MAX_VALUES:,} values (YAML aliases?)")
    try:
        return SweepSpec.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise UserError(f"{where}: {_error_path(first['loc']) or 'sweep'}: {first['msg']}") from None


def _absolute(name: str) -> str:
    """A dataset given as a file path, or a folder setting, made absolute once: Tune runs each
    trial in a folder of its own, where a relative path would point elsewhere."""
    return str(Path(name).expanduser().absolute()) if name.endswith((".txt", ".txt.gz")) else name


def _absolute_paths(spec: SweepSpec) -> SweepSpec:
    def settings(values: dict[str, Any]) -> dict[str, Any]:
        return {
            k: str(Path(v).expanduser().absolute())
            if k in ("data_dir", "mirror") and isinstance(v, str)
            else v
            for k, v in values.items()
        }

    models = [
        entry.model_copy(
            update={
                "datasets": entry.datasets and [_absolute(d) for d in entry.datasets],
                "settings": settings(entry.settings),
            }
        )
        for entry in spec.models
    ]
    return spec.model_copy(
        update={
            "datasets": [_absolute(d) for d in spec.datasets],
            "models": models,
            "settings": settings(spec.settings),
            "overrides": {_absolute(d): settings(v) for d, v in spec.overrides.items()},
        }
    )


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
            TrialConfig.check_keys(dict.fromkeys(entry.search.space), f"{where}: models[{i}].search.space")


def stage_name(dataset: str, index: int) -> str:
    """The search stage of model entry `index` on `dataset` (a folder name under the run's tune/)."""
    return f"search-{dataset_tag(dataset)}-{index}"


def entry_datasets(spec: SweepSpec, index: int) -> list[str]:
    entry = spec.models[index]
    return [d for d in spec.datasets if entry.datasets is None or d in entry.datasets]


def entry_seeds(spec: SweepSpec, index: int) -> list[int]:
    return spec.models[index].seeds or spec.seeds


def entry_trials(
    spec: SweepSpec, index: int, dataset: str, seed: int, where: str, searched: dict[str, Any] | None = None
) -> list[TrialConfig]:
    """The trials of one model entry on one dataset and seed: one per N."""
    entry = spec.models[index]
    negatives = entry.negatives if isinstance(entry.negatives, list) else [entry.negatives]
    out = []
    for n in negatives:
        values = {
            "dataset": dataset,
            "model": entry.model,
            "loss": entry.loss,
            "negatives": n,
            "seed": seed,
            **spec.settings,
            **spec.overrides.get(dataset, {}),
            **entry.settings,
            **(searched or {}),
        }
        out.append(TrialConfig.from_dict(values, f"{where}: models[{index}] on {dataset}"))
    return out


# More trials than one sweep should hold: a mistake in the file, not an experiment.
MAX_TRIALS = 100_000


def grid_size(spec: SweepSpec) -> int:
    """How many trials the sweep's grid has (each search counts once), without building them."""
    total = 0
    for i, entry in enumerate(spec.models):
        negatives = len(entry.negatives) if isinstance(entry.negatives, list) else 1
        seeds = 1 if entry.search is not None else len(entry_seeds(spec, i))
        total += len(entry_datasets(spec, i)) * negatives * seeds
    return total


def expand(spec: SweepSpec, where: str = "sweep") -> list[Trial]:
    """Every trial of the sweep. Searched entries contribute their search's first trial
    shape only (the search stage samples the rest; the seeds stage uses its best setting)."""
    size = grid_size(spec)
    if size > MAX_TRIALS:
        raise UserError(f"{where}: the grid has {size:,} trials, more than one sweep runs ({MAX_TRIALS:,})")
    trials = []
    for dataset in spec.datasets:
        for i, entry in enumerate(spec.models):
            if dataset not in entry_datasets(spec, i):
                continue
            stage = "seeds" if entry.search is None else stage_name(dataset, i)
            for seed in entry_seeds(spec, i) if entry.search is None else entry_seeds(spec, i)[:1]:
                for cfg in entry_trials(spec, i, dataset, seed, where):
                    trials.append(Trial(cfg, stage, trial_key(cfg)))
                if entry.search is not None:
                    check_space(spec, i, dataset, where)
    counts = Counter(t.key for t in trials)
    duplicated = sorted(k for k, n in counts.items() if n > 1)
    if duplicated:
        raise UserError(f"{where}: the same trial appears twice ({duplicated[0]}); remove the repeated entry")
    _check_compare(spec, trials, where)
    return trials


def _check_compare(spec: SweepSpec, trials: list[Trial], where: str) -> None:
    """Each pair under `compare:` names two of the sweep's models that share a dataset."""
    datasets: dict[str, set[str]] = {}
    for t in trials:
        datasets.setdefault(t.config.label, set()).add(t.config.dataset)
    for i, (a, b) in enumerate(spec.compare):
        for name in (a, b):
            if name not in datasets:
                raise UserError(
                    f"{where}: compare[{i}]: unknown model {name!r} (this sweep's models: "
                    f"{', '.join(sorted(datasets))})"
                )
        if not datasets[a] & datasets[b]:
            raise UserError(f"{where}: compare[{i}]: {a} and {b} never run on the same dataset")


# Combinations of searched values checked together (beyond it, each value on its own).
MAX_COMBINATIONS = 4096


def _candidates(name: str, d: Distribution, where: str) -> list[Any]:
    """The values to check for a searched setting: every choice, or a range's two ends."""
    integer = TrialConfig.is_integer(name)
    if d.choice is not None:
        return list(d.choice)
    if d.randint is not None:
        return [d.randint[0], d.randint[1] - 1]  # high is exclusive
    kind, bounds = ("uniform", d.uniform) if d.uniform is not None else ("loguniform", d.loguniform)
    if integer:
        raise UserError(
            f"{where}: {kind} draws real numbers, but {name!r} is an integer setting (use randint or choice)"
        )
    return list(bounds)


def check_space(spec: SweepSpec, index: int, dataset: str, where: str) -> None:
    """Every value the entry's search can produce must make a valid trial: checked before Ray
    starts, not when a sampled trial fails halfway through the sweep."""
    space = spec.models[index].search.space
    options = {
        name: _candidates(name, d, f"{where}: models[{index}].search.space.{name}")
        for name, d in space.items()
    }
    combinations = math.prod(len(v) for v in options.values())
    if combinations <= MAX_COMBINATIONS:
        samples = [dict(zip(options, values)) for values in itertools.product(*options.values())]
    else:
        samples = [{name: value} for name, values in options.items() for value in values]
    for sample in samples:
        try:
            entry_trials(spec, index, dataset, entry_seeds(spec, index)[0], where, sample)
        except UserError as exc:
            shown = ", ".join(f"{k}={v!r}" for k, v in sample.items())
            raise UserError(
                f"{where}: models[{index}].search.space can produce {shown}, which is not a valid "
                f"trial: {str(exc).removeprefix(f'{where}: models[{index}] on {dataset}: ')}"
            ) from None


def restricted(spec: SweepSpec, datasets: list[str] | None, where: str) -> SweepSpec:
    """The sweep on some of its datasets only (its run directory is then named for them)."""
    if not datasets:
        return spec
    absolute = [d if d in spec.datasets else str(Path(d).absolute()) for d in datasets]
    unknown = [d for d, a in zip(datasets, absolute) if a not in spec.datasets]
    if unknown:
        raise UserError(
            f"{where}: --datasets {unknown[0]} is not one of the sweep's datasets {spec.datasets}"
        )
    return spec.model_copy(
        update={"datasets": absolute, "overrides": {d: v for d, v in spec.overrides.items() if d in absolute}}
    )
