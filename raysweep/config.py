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

# The one list of models and losses (the sweep files' schema, the command line and the
# trainer read these). BERT4Rec learns by masking items; the others predict the next item.
MODELS = ("sasrec", "bert4rec", "gru4rec", "bpr")
LOSSES = ("bce", "ce", "sampled_ce", "gbce")
MASKED_MODELS = ("bert4rec",)
SAMPLED_LOSSES = ("sampled_ce", "gbce")  # the losses that take N negatives
NEGATIVE_SOURCES = ("uniform", "in_batch", "mixed")  # sampled_ce's (negatives.from_source)


@dataclass(frozen=True)
class TrialConfig:
    dataset: str
    model: str = "sasrec"
    loss: str | None = None  # sasrec / gru4rec: one of LOSSES; bert4rec: ce; bpr: none
    negatives: int | None = None  # N of sampled_ce and gbce
    seed: int = 0
    # gbce (gSASRec's generalised BCE): its calibration t in [0, 1] (None: 0.75), and whether the
    # N negatives are shared by a sequence's steps as in loss (3) ("sequence") or drawn per position.
    gbce_t: float | None = None
    negatives_per: str = "sequence"
    # sampled_ce: where its N negatives come from (uniform, in_batch, mixed), and the logQ
    # correction (each candidate's logit minus the log of its sampling probability).
    negatives_from: str = "uniform"
    logq: bool = False
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
    amp: bool = True  # bf16 autocast where the device has native bf16 (devices.native_bf16)
    # CUDA only: each full batch's step (forward, backward, Adam) replayed as one captured CUDA
    # graph, over fixed shapes (padding masked rather than trimmed). Off until measured on a card.
    cuda_graphs: bool = False
    # Full CE's back-end (full_ce): PyTorch's chunked op ("torch", PyTorch >= 2.13) or raysweep's
    # own ("raysweep"); "auto" takes PyTorch's where it exists. The same loss either way.
    ce_backend: str = "auto"
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

    def check_seed(self, where: str) -> None:
        """A seed every generator takes (torch, NumPy and implicit: 0 <= seed < 2^32)."""
        if not 0 <= self.seed < 2**32:
            raise UserError(f"{where}: seed must be an integer in [0, 2^32), got {self.seed}")

    def resolved(self, where: str = "trial") -> TrialConfig:
        """Fill the paper's defaults and refuse impossible combinations."""
        from raysweep.data import get_dataset

        self.check_seed(where)
        try:  # free-form tags travel in records and Tune's JSON: plain JSON values only
            json.dumps(self.extra, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise UserError(
                f"{where}: extra must hold plain JSON values (numbers, strings, lists), {exc}"
            ) from None
        ds = get_dataset(self.dataset)
        bert = self.model == "bert4rec"
        if self.model not in MODELS:
            raise UserError(f"{where}: unknown model {self.model!r} (known: {', '.join(MODELS)})")
        loss = self.loss
        if self.model == "bpr":
            if loss is not None or self.negatives is not None:
                raise UserError(
                    f"{where}: model 'bpr' (BPR-MF) takes no loss or negatives, got loss={loss!r}"
                )
        elif bert:
            loss = loss or "ce"
            if loss != "ce":
                raise UserError(f"{where}: BERT4Rec trains with 'ce' on masked positions, not {loss!r}")
        elif loss is None:
            raise UserError(f"{where}: model {self.model!r} needs a loss ({', '.join(LOSSES)})")
        elif loss not in LOSSES:
            raise UserError(f"{where}: unknown loss {loss!r} (known: {', '.join(LOSSES)})")
        if loss in SAMPLED_LOSSES:
            if self.negatives is None or self.negatives < 1:
                raise UserError(f"{where}: loss {loss!r} needs negatives N >= 1, got {self.negatives}")
        elif self.negatives is not None:
            raise UserError(
                f"{where}: negatives={self.negatives} only applies to the losses "
                f"{' and '.join(SAMPLED_LOSSES)}, not {loss!r}"
            )
        gbce_t = self._check_losses(loss, where)
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
            raise UserError(
                f"{where}: learning rates must be > 0 and regularization >= 0, got lr={self.lr}, "
                f"bpr_lr={self.bpr_lr}, regularization={self.regularization}"
            )
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise UserError(f"{where}: device must be auto, cpu or cuda[:i], got {self.device!r}")
        from raysweep import full_ce

        ce_backend = full_ce.DEFAULT_BACKEND if self.ce_backend == "auto" else self.ce_backend
        if ce_backend not in full_ce.BACKENDS:
            raise UserError(
                f"{where}: ce_backend must be auto, {' or '.join(full_ce.BACKENDS)}, got {self.ce_backend!r}"
            )
        if ce_backend == "torch" and full_ce.DEFAULT_BACKEND != "torch":
            raise UserError(f"{where}: ce_backend 'torch' needs PyTorch >= 2.13 (this is {torch_version()})")
        if self.cuda_graphs and self.device == "cpu":
            raise UserError(f"{where}: cuda_graphs needs a CUDA device, and device is 'cpu'")
        heads = self.heads or (2 if bert else 1)
        hidden = self.hidden or ds.hidden
        if self.model in ("sasrec", "bert4rec") and hidden % heads:
            raise UserError(f"{where}: hidden size {hidden} is not divisible by {heads} heads")
        return dataclasses.replace(
            self,
            loss=loss,
            hidden=hidden,
            heads=heads,
            max_len=self.max_len or ds.max_len,
            ce_backend=ce_backend,
            gbce_t=gbce_t,
            max_epochs=self.max_epochs or (200 if bert else 100),
            patience=self.patience or (20 if bert else 10),
        )

    def _check_losses(self, loss: str | None, where: str) -> float | None:
        """The settings of gbce and of sampled_ce's negative sources; gbce's t resolved."""
        if self.negatives_per not in ("sequence", "position"):
            raise UserError(
                f"{where}: negatives_per must be 'sequence' or 'position', got {self.negatives_per!r}"
            )
        if self.negatives_from not in NEGATIVE_SOURCES:
            raise UserError(
                f"{where}: negatives_from must be one of {', '.join(NEGATIVE_SOURCES)}, "
                f"got {self.negatives_from!r}"
            )
        if loss != "gbce" and (self.gbce_t is not None or self.negatives_per != "sequence"):
            raise UserError(f"{where}: gbce_t and negatives_per apply to loss 'gbce' only, not {loss!r}")
        if loss != "sampled_ce" and (self.negatives_from != "uniform" or self.logq):
            raise UserError(f"{where}: negatives_from and logq apply to loss 'sampled_ce' only, not {loss!r}")
        if self.negatives_from != "uniform":
            if self.batch_size < 2:
                raise UserError(
                    f"{where}: in-batch negatives come from the batch's other sequences, and "
                    f"batch_size is {self.batch_size}"
                )
            if self.negatives_from == "mixed" and self.negatives < 2:
                raise UserError(
                    f"{where}: mixed negatives split N between uniform and in-batch draws, N >= 2, "
                    f"got {self.negatives}"
                )
            if self.cuda_graphs:
                raise UserError(
                    f"{where}: cuda_graphs replays uniform negatives only, not {self.negatives_from!r}"
                )
        if loss != "gbce":
            return None
        t = 0.75 if self.gbce_t is None else self.gbce_t
        if not (math.isfinite(t) and 0.0 <= t <= 1.0):
            raise UserError(f"{where}: gbce_t must be in [0, 1], got {t}")
        if self.cuda_graphs:
            raise UserError(f"{where}: cuda_graphs replays bce, ce and sampled_ce steps, not gbce")
        return t

    @property
    def label(self) -> str:
        """The model's name in the paper's tables: SASRec, SASRec+, SASRec+ 3000, BERT4Rec, ..."""
        if self.model == "bpr":
            return "BPR-MF"
        if self.model == "bert4rec":
            return "BERT4Rec"
        if self.model == "gru4rec":
            return (
                "GRU4Rec"
                if self.loss == "ce"
                else f"GRU4Rec ({self.loss}{'' if self.negatives is None else f' {self.negatives}'})"
            )
        if self.loss == "gbce":
            per = " per position" if self.negatives_per == "position" else ""
            return f"gSASRec {self.negatives}{per} (t={0.75 if self.gbce_t is None else self.gbce_t:g})"
        if self.loss == "sampled_ce":
            source = {"uniform": "", "in_batch": " in-batch", "mixed": " mixed"}[self.negatives_from]
            return f"SASRec+ {self.negatives}{source}{' logQ' if self.logq else ''}"
        return {"bce": "SASRec", "ce": "SASRec+"}[self.loss]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def torch_version() -> str:
    import torch

    return torch.__version__


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
HOW = ("device", "cuda_graphs", "ce_backend", "data_dir", "mirror", "extra")
DEFAULTS = {
    f.name: f.default for f in dataclasses.fields(TrialConfig) if f.default is not dataclasses.MISSING
}


def dataset_tag(name: str) -> str:
    """A dataset's name as one plain path component: registry names as they are, a file path as
    its file name plus a hash of the full path (so `../x.txt` never becomes a folder `..`)."""
    if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) and not name.endswith((".txt", ".txt.gz")):
        return name
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(name).name.removesuffix(".gz").removesuffix(".txt")).lstrip(
        "."
    )
    # (a path component holds at most 255 bytes: the stem is cut, the hash keeps names apart)
    return f"{stem[:60] or 'data'}-{hashlib.sha1(name.encode()).hexdigest()[:6]}"


def trial_key(cfg: TrialConfig) -> str:
    """`<dataset>-<model>-<loss>[-N]-s<seed>-<hash>`: readable, and unique per settings. The hash
    covers the settings that differ from their defaults, so a setting added later (at a default
    that keeps today's behaviour) leaves earlier keys as they are."""
    identity = {
        f.name: getattr(cfg, f.name)
        for f in dataclasses.fields(cfg)
        if f.name not in HOW and DEFAULTS.get(f.name, dataclasses.MISSING) != getattr(cfg, f.name)
    }
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
