"""The settings of one trial: typed, validated, with the paper's defaults filled in.

A trial is one dataset x model x loss x N x seed (plus any searched hyper-parameter). The
sweep layer builds these from sweep files; `python -m raysweep.train` from its flags; both
go through `TrialConfig.from_dict`, so an unknown key or a bad value is refused the same way.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raysweep.errors import UserError

MODELS = ("sasrec", "bert4rec", "gru4rec", "bpr")
LOSSES = ("bce", "ce", "sampled_ce")


@dataclass(frozen=True)
class TrialConfig:
    dataset: str
    model: str = "sasrec"
    loss: str | None = None  # sasrec / gru4rec: bce, ce or sampled_ce; bert4rec: ce; bpr: none
    negatives: int | None = None  # N of sampled_ce
    seed: int = 0
    # Architecture; None takes the paper's value for the dataset / model.
    hidden: int | None = None
    blocks: int = 2
    heads: int | None = None
    max_len: int | None = None
    dropout: float = 0.1
    # Optimisation and the patience rule (None: 100 epochs / patience 10, BERT4Rec 200 / 20).
    batch_size: int = 128
    lr: float = 1e-3
    max_epochs: int | None = None
    patience: int | None = None
    val_users: int = 10_000
    # BPR-MF (implicit's BayesianPersonalizedRanking); the paper's ML-1M optimum by default.
    factors: int = 128
    bpr_lr: float = 0.05
    regularization: float = 0.01
    iterations: int = 100
    # Where and how it runs.
    device: str = "auto"  # auto: cuda when available
    amp: bool = True  # bf16 autocast where the device has native bf16 (trainer.native_bf16)
    # CUDA only: each full batch's step (forward, backward, Adam) replayed as one captured CUDA
    # graph, over fixed shapes (padding masked rather than trimmed). Off until measured on a card.
    cuda_graphs: bool = False
    data_dir: str | None = None
    mirror: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)  # free-form tags (sweep stage, ...)

    @classmethod
    def check_keys(cls, values: dict[str, Any], where: str) -> None:
        """Refuse unknown settings and values of the wrong type (None passes: "use the default")."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        for key, value in values.items():
            if key not in known:
                raise UserError(f"{where}: unknown setting {key!r} (known: {', '.join(known)})")
            if value is not None:
                _check_type(key, value, known[key].type, where)

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "trial") -> TrialConfig:
        cls.check_keys(values, where)
        if "dataset" not in values:
            raise UserError(f"{where}: missing setting 'dataset'")
        # None means "the default" (e.g. negatives: null in a sweep file for a non-sampled loss).
        return cls(**{k: v for k, v in values.items() if v is not None}).resolved(where)

    def resolved(self, where: str = "trial") -> TrialConfig:
        """Fill the paper's defaults and refuse impossible combinations."""
        from raysweep.data import get_dataset

        ds = get_dataset(self.dataset)
        bert = self.model == "bert4rec"
        if self.model not in MODELS:
            raise UserError(f"{where}: unknown model {self.model!r} (known: {', '.join(MODELS)})")
        loss = self.loss
        if self.model == "bpr":
            if loss is not None or self.negatives is not None:
                raise UserError(f"{where}: model 'bpr' (BPR-MF) takes no loss or negatives, got loss={loss!r}")
        elif bert:
            loss = loss or "ce"
            if loss != "ce":
                raise UserError(f"{where}: BERT4Rec trains with 'ce' on masked positions, not {loss!r}")
        elif loss is None:
            raise UserError(f"{where}: model {self.model!r} needs a loss ({', '.join(LOSSES)})")
        elif loss not in LOSSES:
            raise UserError(f"{where}: unknown loss {loss!r} (known: {', '.join(LOSSES)})")
        if loss == "sampled_ce":
            if self.negatives is None or self.negatives < 1:
                raise UserError(f"{where}: loss 'sampled_ce' needs negatives N >= 1, got {self.negatives}")
        elif self.negatives is not None:
            raise UserError(f"{where}: negatives={self.negatives} only applies to loss 'sampled_ce', not {loss!r}")
        for name in ("blocks", "batch_size", "val_users", "factors", "iterations"):
            if getattr(self, name) < 1:
                raise UserError(f"{where}: {name} must be >= 1, got {getattr(self, name)}")
        for name in ("hidden", "heads", "max_len", "max_epochs", "patience"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"{where}: {name} must be >= 1, got {value}")
        for name in ("lr", "bpr_lr", "regularization", "dropout"):
            if not math.isfinite(getattr(self, name)):
                raise UserError(f"{where}: {name} must be a finite number, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"{where}: dropout must be in [0, 1), got {self.dropout}")
        if self.lr <= 0 or self.bpr_lr <= 0 or self.regularization < 0:
            raise UserError(f"{where}: learning rates must be > 0 and regularization >= 0, got lr={self.lr}, "
                            f"bpr_lr={self.bpr_lr}, regularization={self.regularization}")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise UserError(f"{where}: device must be auto, cpu or cuda[:i], got {self.device!r}")
        if self.cuda_graphs and self.device == "cpu":
            raise UserError(f"{where}: cuda_graphs needs a CUDA device, and device is 'cpu'")
        heads = self.heads or (2 if bert else 1)
        hidden = self.hidden or ds.hidden
        if self.model in ("sasrec", "bert4rec") and hidden % heads:
            raise UserError(f"{where}: hidden size {hidden} is not divisible by {heads} heads")
        return dataclasses.replace(
            self, loss=loss, hidden=hidden, heads=heads, max_len=self.max_len or ds.max_len,
            max_epochs=self.max_epochs or (200 if bert else 100), patience=self.patience or (20 if bert else 10),
        )

    @property
    def label(self) -> str:
        """The model's name in the paper's tables: SASRec, SASRec+, SASRec+ 3000, BERT4Rec, ..."""
        if self.model == "bpr":
            return "BPR-MF"
        if self.model == "bert4rec":
            return "BERT4Rec"
        if self.model == "gru4rec":
            return "GRU4Rec" if self.loss == "ce" else f"GRU4Rec ({self.loss}{'' if self.negatives is None else f' {self.negatives}'})"
        return {"bce": "SASRec", "ce": "SASRec+"}.get(self.loss or "", f"SASRec+ {self.negatives}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_type(key: str, value: Any, annotation: str, where: str) -> None:
    """Check a value against the field's annotation (the few forms used above)."""
    allowed = {"int": int, "float": (int, float), "str": str, "bool": bool, "dict[str, Any]": dict}
    parts = [p.strip() for p in str(annotation).split("|")]
    if value is None and "None" in parts:
        return
    for part in parts:
        kind = allowed.get(part)
        if kind is None:
            continue
        if isinstance(value, bool) and part != "bool":
            continue  # YAML's `true` is not a number
        if isinstance(value, kind):
            return
    raise UserError(f"{where}: setting {key!r} must be {' or '.join(parts)}, got {value!r}")


# How a trial runs, not what it computes: left out of its key.
HOW = ("device", "cuda_graphs", "data_dir", "mirror", "extra")
DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrialConfig) if f.default is not dataclasses.MISSING}


def dataset_tag(name: str) -> str:
    """A dataset's name as one plain path component: registry names as they are, a file path as
    its file name plus a hash of the full path (so `../x.txt` never becomes a folder `..`)."""
    if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) and not name.endswith((".txt", ".txt.gz")):
        return name
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(name).name.removesuffix(".gz").removesuffix(".txt")).lstrip(".")
    return f"{stem or 'data'}-{hashlib.sha1(name.encode()).hexdigest()[:6]}"


def trial_key(cfg: TrialConfig) -> str:
    """`<dataset>-<model>-<loss>[-N]-s<seed>-<hash>`: readable, and unique per settings. The hash
    covers the settings that differ from their defaults, so a setting added later (at a default
    that keeps today's behaviour) leaves earlier keys as they are."""
    identity = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
                if f.name not in HOW and DEFAULTS.get(f.name, dataclasses.MISSING) != getattr(cfg, f.name)}
    digest = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]
    parts = [dataset_tag(cfg.dataset), cfg.model, cfg.loss or "", str(cfg.negatives or ""), f"s{cfg.seed}", digest]
    return "-".join(p for p in parts if p)
