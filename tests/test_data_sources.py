"""Every data file `datasets` reads (JSON/JSON lines also compressed, CSV, Parquet, Arrow) gives the same normalised
rows as the plain .json it was written from; a dataset repo (`hub:`) is read through datasets.load_dataset, from a
local repo dir and from a Hub cache snapshot with HF_HUB_OFFLINE=1."""

from __future__ import annotations

import bz2
import csv
import gzip
import json
import lzma
import subprocess
import sys

import pytest
from hubcache import make_hub_cache

from emoe_llm.data import read_source
from emoe_llm.data.config import data_config_from_dict, resolve_hub_source
from emoe_llm.data.formats import DataError, source_files

ROWS = [{"instruction": f"Say {w}.", "input": "", "output": w} for w in ("one", "two", "three", "four")]


def _jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _write_zst(path, data: bytes):
    zstandard = pytest.importorskip("zstandard")
    path.write_bytes(zstandard.ZstdCompressor().compress(data))


def _messages(path, **kw):
    records, fmt, _ = read_source(str(path), **kw)
    return fmt, [[(m["role"], m["content"]) for m in r["messages"]] for r in records]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    p = tmp_path_factory.mktemp("ref") / "ref.json"
    p.write_text(json.dumps(ROWS))
    return _messages(p)


@pytest.mark.parametrize("name", ["x.jsonl.gz", "x.json.gz", "x.jsonl.bz2", "x.jsonl.xz", "x.jsonl.zst",
                                  "x.json.zst", "x.csv", "x.csv.gz", "x.parquet", "x.arrow"])
def test_every_file_kind_reads_the_same_rows(tmp_path, reference, name):
    path = tmp_path / name
    raw = _jsonl(ROWS)
    if name.startswith("x.json."):
        raw = json.dumps(ROWS).encode()  # a JSON list, compressed
    if ".csv" in name:
        import io

        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=["instruction", "input", "output"])
        w.writeheader()
        w.writerows(ROWS)
        raw = buf.getvalue().encode()
    if name.endswith(".gz"):
        path.write_bytes(gzip.compress(raw))
    elif name.endswith(".bz2"):
        path.write_bytes(bz2.compress(raw))
    elif name.endswith(".xz"):
        path.write_bytes(lzma.compress(raw))
    elif name.endswith(".zst"):
        _write_zst(path, raw)
    elif name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(ROWS), path)
    elif name.endswith(".arrow"):
        import datasets

        # what datasets writes itself (an Arrow IPC stream), the file a user finds in a datasets cache
        ds = datasets.Dataset.from_list(ROWS)
        ds.save_to_disk(str(tmp_path / "saved"))
        path.write_bytes(next((tmp_path / "saved").glob("*.arrow")).read_bytes())
    else:
        path.write_bytes(raw)
    assert _messages(path) == reference


def test_a_bad_line_in_a_gzipped_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl.gz"
    path.write_bytes(gzip.compress(_jsonl(ROWS[:2]) + b"{not json\n"))
    with pytest.raises(DataError, match=r"bad\.jsonl\.gz: line 3: not valid JSON"):
        read_source(str(path))


def test_a_truncated_gzip_is_one_error_naming_the_file(tmp_path):
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(gzip.compress(_jsonl(ROWS * 50))[:60])
    with pytest.raises(DataError, match=r"cut\.jsonl\.gz: cannot decompress"):
        read_source(str(path))


def test_a_directory_mixing_kinds_names_the_odd_file(tmp_path):
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(_jsonl(ROWS)))
    (tmp_path / "b.jsonl").write_bytes(_jsonl(ROWS))
    assert len(source_files(str(tmp_path))) == 2  # JSON lines plain and compressed are one kind
    (tmp_path / "c.csv").write_text("instruction,input,output\nhi,,there\n")
    with pytest.raises(DataError, match=r"c\.csv: a CSV file in a directory of JSON files"):
        source_files(str(tmp_path))


def test_emoe_llm_data_loads_a_jsonl_gz(tmp_path):
    path = tmp_path / "alpaca.jsonl.gz"
    path.write_bytes(gzip.compress(_jsonl(ROWS)))
    out = subprocess.run([sys.executable, "-m", "emoe_llm.cli", "data", "--source", str(path), "--validate-only"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "format=alpaca usable=4" in out.stdout


def make_dataset_repo(root, rows=ROWS):
    """A dataset repo as the Hub holds one: data/<split>-*.jsonl, found by datasets' data-file layout."""
    (root / "data").mkdir(parents=True)
    (root / "data" / "train-00000-of-00001.jsonl").write_bytes(_jsonl(rows))
    (root / "data" / "test-00000-of-00001.jsonl").write_bytes(_jsonl(rows[:1]))
    return root


def test_hub_source_from_a_local_dataset_repo_picks_the_split(tmp_path, reference):
    repo = make_dataset_repo(tmp_path / "repo")
    cfg = data_config_from_dict({"sources": [{"hub": str(repo), "split": "test"}]})
    src = cfg.sources[0]
    resolve_hub_source(src)
    fmt, msgs = _messages(src.path, load_args=src.load_args())
    assert fmt == "alpaca" and msgs == reference[1][:1]


def test_hub_source_from_the_hub_cache_offline(tmp_path, monkeypatch, reference):
    repo = make_dataset_repo(tmp_path / "repo")
    cache = tmp_path / "hf" / "hub"
    commit = "b" * 40
    make_hub_cache(cache, "org/alpaca", {p.relative_to(repo).as_posix(): p for p in repo.rglob("*.jsonl")},
                   repo_type="dataset", commit=commit)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = data_config_from_dict({"sources": [{"hub": "org/alpaca", "split": "train"}]})
    src = cfg.sources[0]
    resolve_hub_source(src)
    assert src.hub_commit == commit and src.path.endswith(commit)
    assert _messages(src.path, load_args=src.load_args()) == reference
    missing = data_config_from_dict({"sources": [{"hub": "org/absent"}]}).sources[0]
    with pytest.raises(ValueError, match=r"org/absent .*HF_HUB_OFFLINE=1 and it is not in the cache \(searched "
                                         + str(cache)):
        resolve_hub_source(missing)


def test_split_without_hub_is_refused():
    with pytest.raises(ValueError, match="split/name/revision go with `hub:`"):
        data_config_from_dict({"sources": [{"path": "x.json", "split": "test"}]})


def test_path_and_hub_together_are_refused():
    with pytest.raises(ValueError, match="set `path` .* or `hub` .*, not both"):
        data_config_from_dict({"sources": [{"path": "x.json", "hub": "org/name"}]})
