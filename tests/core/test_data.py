import gzip
import http.server
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from raysweep.core import data
from raysweep.core.errors import UserError

BEAUTY_TEXT = gzip.decompress((data.BUNDLED_DIR / "beauty.txt.gz").read_bytes())


# The paper's Table 1: users, items, interactions, average length (cut to two decimals).
TABLE1 = {"ml-1m": (6040, 3416, 999_611, 165.49), "beauty": (40_226, 54_542, 353_962, 8.79)}


def _table1_row(frame):
    stats = data.table1(frame)
    return stats["users"], stats["items"], stats["interactions"], int(stats["avg_len"] * 100) / 100


def test_bundled_beauty_matches_table1():
    assert _table1_row(data.load_interactions("beauty")) == TABLE1["beauty"]


def test_ml1m_matches_table1(ml1m):
    assert _table1_row(ml1m) == TABLE1["ml-1m"]


def test_stats_command_prints_table1(ml1m):
    out = subprocess.run(
        [sys.executable, "-m", "raysweep.data", "stats", "ml-1m", "beauty"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "999,611 (999,611)" in out and "353,962 (353,962)" in out  # ours (the paper's)
    assert "165.49 (165.49)" in out and "8.79 (8.79)" in out


def test_git_blob_id_matches_git(tmp_path):
    path = tmp_path / "f.txt"
    path.write_bytes(b"1 2\n1 3\n")
    expected = subprocess.run(
        ["git", "hash-object", str(path)], capture_output=True, text=True, check=True
    ).stdout
    assert data.git_blob_id(path.read_bytes()) == expected.strip()


def test_cache_is_parquet_and_reused(tmp_path):
    frame = data.load_interactions("beauty", data_dir=tmp_path)
    cache = tmp_path / "beauty" / f"interactions.v{data.CACHE_VERSION}.parquet"
    assert cache.is_file() and len(frame) == 353_962
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.parametrize(
    "text, message",
    [
        (b"", "empty file"),
        (b"1 2\n1 3\n1 x\n", "line 3"),
        (b"1 2\n1 3 4\n", "line 2"),
        (b"1 2\n1\t3\n", "line 2"),
        (b"1 2\n1 2.5\n", "line 2"),
        (b"1 2\n1 inf\n", "line 2"),
        (b"1 2\n0 3\n", "line 2: ids must be positive"),
        (b"1 2\n2 3\n1 4\n", "line 3: user 1 appears again"),
    ],
)
def test_malformed_file_names_the_line(text, message):
    with pytest.raises(UserError, match=message) as info:
        data.parse_interactions(text, "some/file.txt")
    assert "some/file.txt" in str(info.value)


def test_own_file_missing_empty_or_malformed(tmp_path):
    with pytest.raises(UserError, match="no such data file"):
        data.load_interactions(str(tmp_path / "mine.txt"))
    (tmp_path / "mine.txt").write_text("")
    with pytest.raises(UserError, match="mine.txt: empty file"):
        data.load_interactions(str(tmp_path / "mine.txt"))
    (tmp_path / "mine.txt").write_text("1 2\n1 3\n1 three\n")
    with pytest.raises(UserError, match="mine.txt, line 3"):
        data.load_interactions(str(tmp_path / "mine.txt"))
    (tmp_path / "mine.txt").write_text("1 2\n1 3\n1 4\n")
    assert len(data.load_interactions(str(tmp_path / "mine.txt"))) == 3


def test_unknown_dataset():
    with pytest.raises(UserError, match="unknown dataset 'ml-2m'"):
        data.load_interactions("ml-2m")


def _serve(directory: Path):
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(directory), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_download_verifies_and_caches(tmp_path, monkeypatch):
    served = tmp_path / "upstream"
    served.mkdir()
    (served / "beauty.txt").write_bytes(BEAUTY_TEXT)
    server = _serve(served)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/beauty.txt"
        monkeypatch.setitem(data.REGISTRY, "beauty", replace(data.REGISTRY["beauty"], url=url, bundled=False))
        frame = data.load_interactions(
            "beauty", data_dir=tmp_path / "cache", mirror=tmp_path / "empty-mirror"
        )
        assert len(frame) == 353_962
        assert (tmp_path / "cache" / "beauty" / "beauty.txt").read_bytes() == BEAUTY_TEXT

        # A corrupted copy upstream is refused and nothing is left in the cache.
        (served / "beauty.txt").write_bytes(BEAUTY_TEXT.replace(b"1 2\n", b"1 3\n", 1))
        with pytest.raises(UserError, match="checksum mismatch"):
            data.load_interactions("beauty", data_dir=tmp_path / "cache2", mirror=tmp_path / "empty-mirror")
        assert not (tmp_path / "cache2").exists() or not any(
            p.is_file() for p in (tmp_path / "cache2").rglob("*")
        )
    finally:
        server.shutdown()


def test_download_failure_is_one_line(tmp_path, monkeypatch):
    server = _serve(tmp_path)  # serves an empty folder: 404
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/missing.txt"
        monkeypatch.setitem(data.REGISTRY, "beauty", replace(data.REGISTRY["beauty"], url=url, bundled=False))
        with pytest.raises(UserError, match="download of .* failed"):
            data.load_interactions("beauty", data_dir=tmp_path / "cache", mirror=tmp_path / "none")
    finally:
        server.shutdown()


def test_corrupt_mirror_copy_is_refused(tmp_path):
    (tmp_path / "ml-1m").mkdir()
    (tmp_path / "ml-1m" / "ml-1m.txt").write_bytes(b"1 1\n1 2\n1 3\n")
    with pytest.raises(UserError, match="ml-1m.txt: checksum mismatch"):
        data.load_interactions("ml-1m", data_dir=tmp_path / "cache", mirror=tmp_path)
    assert not (tmp_path / "cache" / "ml-1m").exists()


def test_cli_bad_input_exits_2(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "raysweep.data", "stats", "nope"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: unknown dataset 'nope' (known: " + ", ".join(data.REGISTRY) + ", or a path to a .txt file)"
    ]
    # A value pandas casts with a warning before refusing it: still the one line.
    (tmp_path / "mine.txt").write_text("1 2\n1 1e30\n")
    result = subprocess.run(
        [sys.executable, "-m", "raysweep.data", "stats", str(tmp_path / "mine.txt")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'mine.txt'}, line 2: expected 'user_id item_id' "
        "(two positive integers below 10^18 separated by one space), got '1 1e30'"
    ]


def test_offline_a_missing_dataset_names_the_ways_out_and_stats_prints_the_rest(tmp_path, offline_env):
    result = subprocess.run(
        [sys.executable, "-m", "raysweep.data", "stats", "ml-1m", "beauty"],
        capture_output=True, text=True, env=offline_env, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2
    assert "beauty" in result.stdout and "353,962 (353,962)" in result.stdout  # bundled: printed
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: dataset 'ml-1m': download of ") and " failed (" in error
    assert "it is not on this machine: set RAYSWEEP_MIRROR to a folder holding ml-1m.txt" in error
    assert "`python -m raysweep.data fetch ml-1m` on a connected machine" in error
    assert "--datasets beauty" in error
    assert not (tmp_path / "cache" / "ml-1m" / "ml-1m.txt").exists()


def test_availability_without_a_download(tmp_path, monkeypatch):
    monkeypatch.delenv("RAYSWEEP_MIRROR", raising=False)
    cache, mirror = tmp_path / "cache", tmp_path / "mirror"
    assert data.is_available("beauty", cache, None) and data.is_available("synthetic-chains", cache, None)
    assert not data.is_available("ml-1m", cache, None)
    (mirror / "ml-1m").mkdir(parents=True)
    (mirror / "ml-1m" / "ml-1m.txt.gz").write_bytes(b"")
    assert data.is_available("ml-1m", cache, mirror)
    assert "ml-1m.txt (9.1 MB)" in data.download_note("ml-1m")
