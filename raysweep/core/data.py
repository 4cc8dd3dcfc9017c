"""The paper's datasets: registry, download + verification, the sequence-file reader, Parquet cache.

Every dataset is the preprocessed BERT4Rec-format file the paper's code reads: one
`user_id item_id` line per interaction, ids 1-based, a user's lines adjacent and in time
order. Files are verified by the upstream git blob id (SHA-1 of `blob <size>\\0<bytes>`),
which needs nothing but the bytes themselves.

Where a file comes from, in order: the Parquet cache in the data directory, a local mirror
(a folder holding the upstream files, possibly gzipped), the copy bundled with the package
(Beauty only: MovieLens' terms forbid redistribution), the upstream URL. Whatever is
written lands under a temporary name first and is renamed into place once verified.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import sys
import urllib.request
import warnings
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from raysweep.core.atomic import atomic_write
from raysweep.core.errors import UserError

UPSTREAM = (
    "https://raw.githubusercontent.com/antklen/sasrec-bert4rec-recsys23/"
    "29c272e155cad52c8958b04e9e98557526a646e5/data/"
)
BUNDLED_DIR = Path(__file__).parent / "datasets"
CACHE_VERSION = 1  # bump when the parsed layout changes, so old Parquet caches are ignored


@dataclass(frozen=True)
class Dataset:
    """One registry entry: where the file is and how to check it (the paper's settings per dataset
    live in `config.PAPER_DATASETS`)."""

    name: str
    filename: str  # upstream file name (a .txt, or a .zip holding one .txt)
    git_blob: str | None  # blob id of `filename`'s bytes (for .txt: the uncompressed text)
    url: str | None = None
    bundled: bool = False
    generate: Callable[[], pd.DataFrame] | None = None  # synthetic data, made on first use
    path: Path | None = None  # a user's own file in the same format (read as is, not cached)
    download_mb: float | None = None  # the upstream file's size, where known


def _synthetic(name: str) -> Callable[[], pd.DataFrame]:
    def generate() -> pd.DataFrame:
        from raysweep.core import synthetic

        return getattr(synthetic, name.replace("synthetic-", "").replace("-", "_"))()

    return generate


REGISTRY: dict[str, Dataset] = {
    d.name: d
    for d in [
        Dataset(
            "ml-1m",
            "ml-1m.txt",
            "9ab8e3edb8742f8d8cc4911e3dee25e82a6fcc24",
            url=UPSTREAM + "ml-1m.txt",
            download_mb=9.1,
        ),
        Dataset(
            "ml-20m",
            "ml-20m.txt.zip",
            "0d5275e9474179c96f1d3ed75d273f9de269f52a",
            url=UPSTREAM + "ml-20m.txt.zip",
        ),
        Dataset(
            "steam",
            "steam.txt.zip",
            "66ebaeb12e06e92e7351e073242da3eda227d389",
            url=UPSTREAM + "steam.txt.zip",
        ),
        Dataset(
            "beauty",
            "beauty.txt",
            "16718a33ebdb33504f257421b18ae8bf3ddfe327",
            url=UPSTREAM + "beauty.txt",
            bundled=True,
            download_mb=3.9,
        ),
        Dataset(
            "yelp",
            "yelp.txt.zip",
            "136842233ea273d82f23ceb0dd0cb5207bd0e449",
            url=UPSTREAM + "yelp.txt.zip",
        ),
        # Small generated data with a planted pattern, for tests and the smoke sweep.
        Dataset("synthetic-chains", "synthetic-chains.txt", None, generate=_synthetic("chains")),
        Dataset("synthetic-shuffled", "synthetic-shuffled.txt", None, generate=_synthetic("shuffled")),
        Dataset("synthetic-clusters", "synthetic-clusters.txt", None, generate=_synthetic("clusters")),
    ]
}


def get_dataset(name: str) -> Dataset:
    """A registry entry, or a user's own `.txt` / `.txt.gz` sequence file given by path."""
    if name.endswith((".txt", ".txt.gz")):
        path = Path(name)
        try:
            if path.is_dir():
                raise UserError(f"{name}: is a folder, not a data file")
            if not path.is_file():
                raise UserError(f"{name}: no such data file")
        except OSError as exc:  # a name longer than the file system allows, say
            raise UserError(f"{name[:120]}...: cannot be a data file ({exc.strerror})") from None
        return Dataset(name=name, filename=path.name, git_blob=None, path=path)
    try:
        return REGISTRY[name]
    except KeyError:
        raise UserError(
            f"unknown dataset {name!r} (known: {', '.join(REGISTRY)}, or a path to a .txt file)"
        ) from None


def default_data_dir() -> Path:
    return Path(os.environ.get("RAYSWEEP_DATA_DIR") or Path.home() / ".cache" / "raysweep")


def default_mirror() -> Path | None:
    mirror = os.environ.get("RAYSWEEP_MIRROR")
    return Path(mirror) if mirror else None


def git_blob_id(data: bytes) -> str:
    """The id git gives these bytes (`git hash-object`)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _plain_bytes(path: Path) -> bytes:
    """The file's content, decompressed if it is gzip (the mirror keeps `.txt.gz` files)."""
    data = path.read_bytes()
    if data[:2] != b"\x1f\x8b":
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:
        raise UserError(f"{path}: corrupt gzip file ({exc})") from None


def _verify(ds: Dataset, data: bytes, where: str) -> None:
    if ds.git_blob is not None and git_blob_id(data) != ds.git_blob:
        raise UserError(
            f"{where}: checksum mismatch for dataset {ds.name!r} "
            f"(git blob {git_blob_id(data)}, expected {ds.git_blob}); the file is corrupt or not the "
            "upstream one"
        )


def is_available(name: str, data_dir: Path | None = None, mirror: Path | None = None) -> bool:
    """Whether the dataset can be read without a download: generated, bundled, a file of one's
    own, already in the data cache, or in the mirror."""
    ds = get_dataset(name)
    if ds.generate is not None or ds.path is not None or ds.bundled:
        return True
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    mirror = mirror if mirror is not None else default_mirror()
    here = data_dir / ds.name
    if (here / f"interactions.v{CACHE_VERSION}.parquet").is_file() or (here / ds.filename).is_file():
        return True
    return mirror is not None and _find_in_mirror(ds, mirror) is not None


def download_note(name: str) -> str:
    """What obtaining a dataset that is not here costs, in a few words."""
    ds = get_dataset(name)
    size = f"{ds.download_mb:g} MB" if ds.download_mb else "size not recorded"
    return f"downloads {ds.filename} ({size}) from the paper's repository on first use"


def ways_out(name: str, data_dir: Path) -> str:
    """Where a dataset that is not on this machine can come from."""
    ds = get_dataset(name)
    return (
        f"set RAYSWEEP_MIRROR to a folder holding {ds.filename}, or run `python -m raysweep.data fetch "
        f"{ds.name}` on a connected machine and copy its {ds.name}/ folder into {data_dir}, or leave the "
        "dataset out (raysweep.run's --datasets, for example --datasets beauty)"
    )


def _download(url: str, where: str) -> bytes:
    print(f"raysweep: downloading {url}", file=sys.stderr)
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0)
            chunks, done, shown = [], 0, 0
            while chunk := response.read(1 << 20):
                chunks.append(chunk)
                done += len(chunk)
                if total and done - shown >= total // 10:
                    print(f"  {done / 1e6:.1f} / {total / 1e6:.1f} MB", file=sys.stderr)
                    shown = done
    except OSError as exc:
        raise UserError(f"{where}: download of {url} failed ({exc})") from None
    return b"".join(chunks)


def _find_in_mirror(ds: Dataset, mirror: Path) -> Path | None:
    for folder in (mirror / ds.name, mirror):
        for name in (ds.filename, ds.filename + ".gz"):
            if (folder / name).is_file():
                return folder / name
    return None


def _raw_text(ds: Dataset, data_dir: Path, mirror: Path | None) -> tuple[bytes, str]:
    """The verified text of the dataset and a description of where it came from."""
    if ds.generate is not None:
        frame = ds.generate()
        return frame.to_csv(sep=" ", header=False, index=False).encode(), "generated"
    local = data_dir / ds.name / ds.filename
    candidates = [local]
    if mirror is not None:
        candidates.append(_find_in_mirror(ds, mirror))
    if ds.bundled:
        candidates.append(BUNDLED_DIR / (ds.filename + ".gz"))
    for path in candidates:
        if path is not None and path.is_file():
            data = _plain_bytes(path)
            _verify(ds, data, str(path))
            source = str(path)
            break
    else:
        if ds.url is None:
            raise UserError(f"dataset {ds.name!r} has no download source and no local copy in {data_dir}")
        try:
            data = _download(ds.url, f"dataset {ds.name!r}")
        except UserError as exc:
            raise UserError(f"{exc}; it is not on this machine: {ways_out(ds.name, data_dir)}") from None
        _verify(ds, data, ds.url)
        atomic_write(local, lambda tmp: tmp.write_bytes(data))
        source = ds.url
    if ds.filename.endswith(".zip"):
        try:
            archive = zipfile.ZipFile(io.BytesIO(data))
        except zipfile.BadZipFile as exc:
            raise UserError(f"{source}: not a zip file ({exc})") from None
        with archive:
            members = [m for m in archive.namelist() if m.endswith(".txt") and not m.startswith("__MACOSX")]
            if len(members) != 1:
                raise UserError(f"{source}: expected one .txt file inside the zip, found {members}")
            data = archive.read(members[0])
    return data, source


def _first_bad_line(text: bytes, where: str) -> UserError:
    """Find the first malformed line of a sequence file and describe it."""
    for number, line in enumerate(text.decode("utf-8", errors="replace").splitlines(), start=1):
        fields = line.split(" ")
        if len(fields) != 2 or not all(re.fullmatch(r"[0-9]{1,18}", f) for f in fields):
            return UserError(
                f"{where}, line {number}: expected 'user_id item_id' (two positive integers below 10^18 "
                f"separated by one space), got {line[:80]!r}"
            )
    return UserError(f"{where}: could not be parsed as 'user_id item_id' lines")


# The largest item id may exceed the number of distinct items this many times (ids with gaps).
MAX_ID_SPREAD = 10


def parse_interactions(text: bytes, where: str) -> pd.DataFrame:
    """Parse and validate a sequence file's text into (user_id, item_id) int64 columns."""
    if not text.strip():
        raise UserError(f"{where}: empty file, no interactions")
    try:
        with warnings.catch_warnings():  # pandas warns before it refuses "inf" or "1e30": one line, ours
            warnings.simplefilter("ignore", RuntimeWarning)
            frame = pd.read_csv(
                io.BytesIO(text),
                sep=" ",
                header=None,
                names=["user_id", "item_id"],
                dtype="int64",
                engine="c",
                skip_blank_lines=False,
            )
    except (ValueError, OverflowError, pd.errors.ParserError):
        raise _first_bad_line(text, where) from None
    if frame.isna().any().any():
        raise _first_bad_line(text, where)
    bad = np.flatnonzero((frame["user_id"].to_numpy() < 1) | (frame["item_id"].to_numpy() < 1))
    if len(bad):
        raise UserError(
            f"{where}, line {bad[0] + 1}: ids must be positive (1-based), got {frame.iloc[bad[0]].tolist()}"
        )
    items = frame["item_id"].to_numpy()
    distinct = len(np.unique(items))
    if items.max() > MAX_ID_SPREAD * distinct + 1000:
        raise UserError(
            f"{where}: item ids run up to {items.max():,} for {distinct:,} distinct items; ids must be "
            "1-based and nearly contiguous (renumber them 1..n): the model holds a row per id"
        )
    users = frame["user_id"].to_numpy()
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    if len(starts) != len(np.unique(users)):
        # A user whose lines are split: the second run of that user is the offending line.
        _, first_run = np.unique(users[starts], return_index=True)
        repeated = np.setdiff1d(np.arange(len(starts)), first_run).min()
        raise UserError(
            f"{where}, line {starts[repeated] + 1}: user {users[starts[repeated]]} "
            "appears again after other users; a user's lines must be adjacent and in time order"
        )
    return frame


def load_interactions(name: str, data_dir: Path | None = None, mirror: Path | None = None) -> pd.DataFrame:
    """The dataset's interactions, from the Parquet cache or obtained, verified and cached."""
    ds = get_dataset(name)
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    mirror = mirror if mirror is not None else default_mirror()
    cache = data_dir / ds.name / f"interactions.v{CACHE_VERSION}.parquet"
    if ds.path is not None:
        return parse_interactions(_plain_bytes(ds.path), str(ds.path))
    if cache.is_file():
        try:
            return pd.read_parquet(cache)
        except (OSError, ValueError) as exc:  # a damaged cache is rebuilt from its verified source
            print(
                f"raysweep: {cache}: unreadable cache ({str(exc).splitlines()[0]}); rebuilding it",
                file=sys.stderr,
            )
    text, source = _raw_text(ds, data_dir, mirror)
    frame = parse_interactions(text, source)
    atomic_write(cache, lambda tmp: frame.to_parquet(tmp, index=False))
    return frame


def table1(frame: pd.DataFrame) -> dict[str, float]:
    """The paper's Table 1 columns for one dataset."""
    users, items, n = frame["user_id"].nunique(), frame["item_id"].nunique(), len(frame)
    return {
        "users": users,
        "items": items,
        "interactions": n,
        "avg_len": n / users,
        "density": n / (users * items),
    }
