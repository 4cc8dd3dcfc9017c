"""The settings of one trial: one typed model with its types, ranges, choices, the paper's
defaults, a description per field and the rules between fields, in one place and without
touching the disk.

A trial is one dataset x model x loss x N x seed (plus any searched hyper-parameter). Sweep
files and `python -m raysweep.train` both go through `TrialConfig.from_dict`, so an unknown key or
a bad value is refused the same way; `--help` is built from the same fields. A setting left out
(or given as null) takes the paper's value for its dataset and model (`PAPER_DATASETS`,
`PAPER_BUDGET`), filled in as the config is made, so every config is complete.
"""

from __future__ import annotations

import hashlib
import json
import re
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from raysweep.core.errors import UserError

Model = Literal["sasrec", "bert4rec", "gru4rec", "bpr"]
Loss = Literal["bce", "ce", "sampled_ce", "gbce"]
MODELS, LOSSES = get_args(Model), get_args(Loss)
SAMPLED_LOSSES = ("sampled_ce", "gbce")  # the losses that take N negatives

# The paper's settings where a trial leaves them open (Klenitskiy & Vasilev, RecSys '23,
# section 4): max length L and hidden size per dataset (a file of one's own: 50 and 64), and
# the epoch budget and patience per model (others: 100 epochs, patience 10).
PAPER_DATASETS = {
    "ml-1m": {"max_len": 200, "hidden": 64},
    "ml-20m": {"max_len": 200, "hidden": 256},
    "steam": {"max_len": 50, "hidden": 64},
    "beauty": {"max_len": 50, "hidden": 64},
    "yelp": {"max_len": 50, "hidden": 64},
    # small generated data with a planted pattern (tests, the smoke sweep)
    "synthetic-chains": {"max_len": 20, "hidden": 64},
    "synthetic-shuffled": {"max_len": 20, "hidden": 64},
    "synthetic-clusters": {"max_len": 20, "hidden": 64},
}
OWN_FILE = {"max_len": 50, "hidden": 64}
PAPER_BUDGET = {"bert4rec": {"max_epochs": 200, "patience": 20}}
BUDGET = {"max_epochs": 100, "patience": 10}
GBCE_T = 0.75  # gSASRec's calibration t


def is_file_dataset(name: str) -> bool:
    return name.endswith((".txt", ".txt.gz"))


class TrialConfig(BaseModel):
    """One trial's settings, complete: what it trains (dataset, model, loss, N, seed and the
    hyper-parameters) and how it runs (device, precision, back-ends, data folders)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    dataset: str = Field(
        min_length=1,
        max_length=4096,
        description="ml-1m, ml-20m, steam, beauty, yelp, synthetic-chains|shuffled|clusters, or a path "
        "to a .txt / .txt.gz file of 'user_id item_id' lines in time order",
    )
    model: Model = Field("sasrec", description="the sequence model, or bpr (BPR-MF through implicit)")
    loss: Loss | None = Field(
        None,
        description="sasrec and gru4rec: bce (SASRec), ce (full CE, SASRec+), sampled_ce (loss (3), "
        "SASRec+ N), gbce (gSASRec); bert4rec: ce; bpr: none",
    )
    negatives: int | None = Field(None, ge=1, description="N negatives of sampled_ce and gbce")
    seed: int = Field(0, ge=0, lt=2**32, description="seeds the model's initialisation and every draw")
    gbce_t: float | None = Field(
        None, ge=0, le=1, allow_inf_nan=False, description=f"gbce's calibration t (default {GBCE_T})"
    )
    negatives_per: Literal["sequence", "position"] = Field(
        "sequence",
        description="gbce: N negatives shared by a sequence's steps, as in loss (3), or per position",
    )
    negatives_from: Literal["uniform", "in_batch", "mixed"] = Field(
        "uniform", description="sampled_ce: where its N negatives come from"
    )
    logq: bool = Field(
        False, description="sampled_ce: subtract the log of each candidate's sampling probability (logQ)"
    )
    hidden: int | None = Field(None, ge=1, description="hidden size (default: 64, ML-20M 256)")
    blocks: int = Field(2, ge=1, description="transformer blocks (sasrec, bert4rec)")
    heads: int | None = Field(None, ge=1, description="attention heads (default: sasrec 1, bert4rec 2)")
    max_len: int | None = Field(
        None, ge=1, description="max sequence length L (default: 200 MovieLens, 50 others)"
    )
    dropout: float = Field(0.1, ge=0, lt=1, allow_inf_nan=False, description="dropout rate")
    batch_size: int = Field(128, ge=1, description="sequences per batch")
    lr: float = Field(1e-3, gt=0, allow_inf_nan=False, description="Adam's learning rate")
    max_epochs: int | None = Field(None, ge=1, description="epoch budget (default: 100, bert4rec 200)")
    patience: int | None = Field(
        None,
        ge=1,
        description="stop after this many epochs without a better validation NDCG@10 (default: "
        "10, bert4rec 20)",
    )
    val_users: int = Field(10_000, ge=1, description="validation users, a fixed sample, scored every epoch")
    factors: int = Field(128, ge=1, description="bpr: latent factors")
    bpr_lr: float = Field(0.05, gt=0, allow_inf_nan=False, description="bpr: learning rate")
    regularization: float = Field(0.01, ge=0, allow_inf_nan=False, description="bpr: L2 regularization")
    iterations: int = Field(100, ge=1, description="bpr: training iterations")
    sampled_n: int = Field(
        100, ge=1, description="negatives per test user of the sampled protocols (BERT4Rec's: 100)"
    )
    samplers: list[Literal["uniform", "popularity"]] = Field(
        ["uniform", "popularity"],
        description="sampled protocols reported beside full ranking: uniform (exact, from the full "
        "rank) and popularity (drawn at test time, its rank stored beside the full one)",
    )
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$",
        description="auto (cuda when available), cpu, cuda[:i]",
    )
    amp: bool = Field(True, description="bf16 autocast where the device has native bf16")
    cuda_graphs: bool = Field(
        False, description="CUDA only: replay each full batch's step as one captured CUDA graph"
    )
    ce_backend: Literal["auto", "torch", "raysweep"] = Field(
        "auto",
        description="full CE's chunked op: PyTorch's (torch >= 2.13) or raysweep's; auto: PyTorch's if it "
        "has it",
    )
    data_dir: str | None = Field(
        None, description="data cache folder (default: $RAYSWEEP_DATA_DIR or ~/.cache/raysweep)"
    )
    mirror: str | None = Field(
        None, description="a folder holding the upstream data files (default: $RAYSWEEP_MIRROR)"
    )
    extra: dict[str, Any] = Field(
        default_factory=dict, description="free-form tags, plain JSON values (not on the command line)"
    )

    @model_validator(mode="before")
    @classmethod
    def _paper_defaults(cls, values: Any) -> Any:
        """Fill what is left open (absent or null) with the paper's value for the dataset and model."""
        if not isinstance(values, dict):
            return values
        values = {k: v for k, v in values.items() if v is not None}
        name, model = values.get("dataset"), values.get("model", "sasrec")
        if not isinstance(name, str) or not isinstance(model, str):
            return values  # the field checks say what is wrong
        fills = {
            **(OWN_FILE if is_file_dataset(name) else PAPER_DATASETS.get(name, {})),
            **PAPER_BUDGET.get(model, BUDGET),
            "heads": 2 if model == "bert4rec" else 1,
        }
        if model == "bert4rec":
            fills["loss"] = "ce"
        if values.get("loss") == "gbce":
            fills["gbce_t"] = GBCE_T
        if values.get("ce_backend", "auto") == "auto":
            values["ce_backend"] = default_ce_backend()
        return {**fills, **values}

    @model_validator(mode="after")
    def _rules(self) -> TrialConfig:
        """The rules between settings."""
        if not is_file_dataset(self.dataset) and self.dataset not in PAPER_DATASETS:
            raise ValueError(
                f"unknown dataset {self.dataset!r} (known: {', '.join(PAPER_DATASETS)}, "
                "or a path to a .txt file)"
            )
        if self.is_bpr and (self.loss is not None or self.negatives is not None):
            raise ValueError(f"model 'bpr' (BPR-MF) takes no loss or negatives, got loss={self.loss!r}")
        if self.is_masked and self.loss != "ce":
            raise ValueError(f"BERT4Rec trains with 'ce' on masked positions, not {self.loss!r}")
        if self.is_sequential and self.loss is None:
            raise ValueError(f"model {self.model!r} needs a loss ({', '.join(LOSSES)})")
        if self.takes_negatives and self.negatives is None:
            raise ValueError(f"loss {self.loss!r} needs negatives N >= 1")
        if not self.takes_negatives and self.negatives is not None:
            raise ValueError(
                f"negatives={self.negatives} only applies to the losses {' and '.join(SAMPLED_LOSSES)}, "
                f"not {self.loss!r}"
            )
        if self.loss != "gbce" and (self.gbce_t is not None or self.negatives_per != "sequence"):
            raise ValueError(f"gbce_t and negatives_per apply to loss 'gbce' only, not {self.loss!r}")
        if self.loss != "sampled_ce" and (self.negatives_from != "uniform" or self.logq):
            raise ValueError(f"negatives_from and logq apply to loss 'sampled_ce' only, not {self.loss!r}")
        if self.negatives_from != "uniform" and self.batch_size < 2:
            raise ValueError(
                "in-batch negatives come from the batch's other sequences, and batch_size is "
                f"{self.batch_size}"
            )
        if self.negatives_from == "mixed" and self.negatives < 2:
            raise ValueError(
                f"mixed negatives split N between uniform and in-batch draws, N >= 2, got {self.negatives}"
            )
        if self.cuda_graphs:
            if self.device == "cpu":
                raise ValueError("cuda_graphs needs a CUDA device, and device is 'cpu'")
            if self.negatives_from != "uniform":
                raise ValueError(f"cuda_graphs replays uniform negatives only, not {self.negatives_from!r}")
            if self.loss == "gbce":
                raise ValueError("cuda_graphs replays bce, ce and sampled_ce steps, not gbce")
        if self.model in ("sasrec", "bert4rec") and self.hidden % self.heads:
            raise ValueError(f"hidden size {self.hidden} is not divisible by {self.heads} heads")
        try:  # free-form tags travel in records and Tune's JSON: plain JSON values only
            json.dumps(self.extra, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"extra must hold plain JSON values (numbers, strings, lists), {exc}") from None
        return self

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "trial") -> TrialConfig:
        """A complete config from settings (missing or null ones take the paper's values); a bad
        setting is one line that names `where`."""
        if "dataset" not in values:
            raise UserError(f"{where}: missing setting 'dataset'")
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            raise UserError(f"{where}: {_first_error(exc)}") from None

    @classmethod
    def check_keys(cls, values: dict[str, Any], where: str) -> None:
        """Some settings on their own (a sweep file's `settings:`, a search space's names): each
        known, and each value of its field's type and range (null: the default)."""
        for key, value in values.items():
            if key not in cls.model_fields:
                raise UserError(f"{where}: unknown setting {key!r} (known: {', '.join(cls.model_fields)})")
            if value is not None:
                try:
                    _field_adapter(key).validate_python(value, strict=True)
                except ValidationError as exc:
                    raise UserError(f"{where}: setting {key!r}: {_first_error(exc, field=False)}") from None

    @classmethod
    def is_integer(cls, name: str) -> bool:
        return int in (cls.model_fields[name].annotation, *get_args(cls.model_fields[name].annotation))

    @property
    def is_bpr(self) -> bool:
        return self.model == "bpr"

    @property
    def is_sequential(self) -> bool:
        return self.model != "bpr"

    @property
    def is_masked(self) -> bool:
        """BERT4Rec learns by masking items; the other sequence models predict the next item."""
        return self.model == "bert4rec"

    @property
    def takes_negatives(self) -> bool:
        return self.loss in SAMPLED_LOSSES

    @property
    def label(self) -> str:
        """The model's name in the paper's tables: SASRec, SASRec+, SASRec+ 3000, BERT4Rec, ..."""
        if self.is_bpr:
            return "BPR-MF"
        if self.is_masked:
            return "BERT4Rec"
        if self.model == "gru4rec":
            return (
                "GRU4Rec"
                if self.loss == "ce"
                else f"GRU4Rec ({self.loss}{'' if self.negatives is None else f' {self.negatives}'})"
            )
        if self.loss == "gbce":
            per = " per position" if self.negatives_per == "position" else ""
            return f"gSASRec {self.negatives}{per} (t={self.gbce_t:g})"
        if self.loss == "sampled_ce":
            source = {"uniform": "", "in_batch": " in-batch", "mixed": " mixed"}[self.negatives_from]
            return f"SASRec+ {self.negatives}{source}{' logQ' if self.logq else ''}"
        return {"bce": "SASRec", "ce": "SASRec+"}[self.loss]

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    def replaced(self, **changes: Any) -> TrialConfig:
        """The same trial with some settings changed, checked again."""
        return TrialConfig.from_dict({**self.to_dict(), **changes})


@cache
def _field_adapter(name: str) -> TypeAdapter:
    info = TrialConfig.model_fields[name]
    return TypeAdapter(Annotated[info.annotation, info])


def _first_error(exc: ValidationError, field: bool = True) -> str:
    error = exc.errors()[0]
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] in ("value_error", "assertion_error"):
        return message
    shown = repr(error["input"])
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    prefix = f"setting {error['loc'][0]!r}: " if field and error["loc"] else ""
    return f"{prefix}{message}, got {shown}"


@cache
def default_ce_backend() -> str:
    from raysweep.core import full_ce

    return full_ce.DEFAULT_BACKEND


# How a trial runs, not what it computes: left out of its key.
HOW = ("device", "cuda_graphs", "ce_backend", "data_dir", "mirror", "extra")
RAW_DEFAULTS = {
    name: info.get_default(call_default_factory=True) for name, info in TrialConfig.model_fields.items()
}


def dataset_tag(name: str) -> str:
    """A dataset's name as one plain path component: registry names as they are, a file path as
    its file name plus a hash of the full path (so `../x.txt` never becomes a folder `..`)."""
    if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) and not is_file_dataset(name):
        return name
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(name).name.removesuffix(".gz").removesuffix(".txt")).lstrip(
        "."
    )
    # (a path component holds at most 255 bytes: the stem is cut, the hash keeps names apart)
    return f"{stem[:60] or 'data'}-{hashlib.sha1(name.encode()).hexdigest()[:6]}"


def trial_key(cfg: TrialConfig) -> str:
    """`<dataset>-<model>-<loss>[-N]-s<seed>-<hash>`: readable, and unique per settings. The hash
    covers the settings that differ from their (unfilled) defaults, so a setting added later at a
    default that keeps today's behaviour leaves earlier keys as they are."""
    values = cfg.to_dict()
    identity = {k: v for k, v in values.items() if k not in HOW and RAW_DEFAULTS[k] != v}
    digest = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]
    parts = [
        dataset_tag(cfg.dataset),
        cfg.model,
        cfg.loss or "",
        str(cfg.negatives or ""),
        f"s{cfg.seed}",
        digest,
    ]
    return "-".join(p for p in parts if p)
