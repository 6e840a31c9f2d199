"""build_sft_datasets: read -> validate -> tokenize (cached) -> split -> mix -> shuffle -> (pack) (cached).

Cache layout (all entries are written to a temp dir and renamed into place, so a crash never leaves half an entry):
  ``<cache_dir>/tokenized/<key>/``  one source's tokenized rows (``datasets.save_to_disk``) + ``stats.json``. The key
      hashes everything that changes the tokens: the source file (absolute path, size, mtime), format, max_rows, the
      tokenizer (serialized vocabulary/merges, special tokens, pad token), the template, max_seq_len, truncation,
      train_on_prompt, system_prompt, skip_bad_rows and PIPELINE_VERSION.
  ``<cache_dir>/final/<key>/``  the returned ``train``/``eval`` datasets + ``stats.json``, keyed by the source keys,
      weights, eval settings, packing and seed. A second identical run loads this directly (memory-mapped, shared
      by all ranks on a node) and neither tokenizes nor packs.
The cache can be deleted at any time.

Multi-process training: call this on the main process first (e.g. ``with main_process_first():``) so the other
ranks find the cache; concurrent writers are still safe (each writes a temp dir and renames it into place).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from .config import DataConfig, DataSource
from .encode import DROPPED_NO_TARGET, DROPPED_TOO_LONG, IGNORE_INDEX, KEPT, TRUNCATED, encode_batch
from .config import resolve_hub_source
from .formats import DataError, iter_records
from .packing import best_fit_bins, pack_arrays
from .templates import BUILTIN, resolve_template

log = logging.getLogger(__name__)

PIPELINE_VERSION = 6  # bump when encoding or the cache layout changes so stale caches are not reused
# (2: official Alpaca prompt; 3: ChatML replies end at their EOS; 4: sources streamed into Arrow; 5: int32 token columns)
WRITER_BATCH = 1000  # rows per Arrow record batch while streaming a source to disk
PACK_BATCH = 256  # packed rows built per numpy batch


def _token_features(*columns: str, extra: dict | None = None):
    """Token columns are stored as int32 (every vocabulary is < 2**31 ids; half the disk and mapped pages of the
    int64 that ``datasets`` infers from Python ints). The collator makes int64 tensors of them."""
    import datasets

    token = datasets.List(datasets.Value("int32"))
    return datasets.Features({c: token for c in columns} | {k: datasets.Value(v) for k, v in (extra or {}).items()})


def default_cache_dir() -> Path:
    return Path(os.environ.get("EMOE_LLM_CACHE", Path.home() / ".cache" / "emoe_llm")) / "data"


def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(type(tokenizer).__name__.encode())
    h.update(json.dumps([str(tokenizer.special_tokens_map), tokenizer.pad_token_id, len(tokenizer)]).encode())
    return h.hexdigest()


def _source_identity(path: str) -> dict:
    p = Path(path).resolve()
    if not p.exists():
        return {"path": str(p)}  # read_source raises the clear error
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file())
        return {"path": str(p), "files": [(str(f.relative_to(p)), f.stat().st_size, f.stat().st_mtime_ns) for f in files]}
    st = p.stat()
    return {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _template_identity(cfg: DataConfig, tokenizer) -> dict:
    """What decides the template without resolving it (a text-only run must not need a chat template)."""
    p = Path(cfg.template)
    file_text = p.read_text(encoding="utf-8") if p.is_file() else None
    return {"name": cfg.template, "file": file_text, "builtin": BUILTIN.get(cfg.template),
            "tokenizer_template": getattr(tokenizer, "chat_template", None)}


def _cache_key(src: DataSource, cfg: DataConfig, tok_fp: str, template: dict) -> str:
    payload = {
        "v": PIPELINE_VERSION, "source": _source_identity(src.path), "format": src.format, "max_rows": src.max_rows,
        "load_args": src.load_args(),
        "tokenizer": tok_fp, "template": template, "max_seq_len": cfg.max_seq_len, "truncation": cfg.truncation,
        "train_on_prompt": cfg.train_on_prompt, "system_prompt": cfg.system_prompt, "skip_bad_rows": cfg.skip_bad_rows,
        "empty_response": cfg.empty_response,
        "template_variation": [cfg.template_variation, cfg.seed] if cfg.template_variation else None,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def _atomic_save(datasets_by_name: dict, stats: dict, final: Path) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))
    try:
        for name, ds in datasets_by_name.items():
            if ds is not None:
                ds.save_to_disk(str(tmp / name))
        (tmp / "stats.json").write_text(json.dumps(stats, indent=1))
        os.rename(tmp, final)
    except OSError:
        if not (final / "stats.json").exists():
            raise
        log.info("cache entry %s was written concurrently; using it", final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def load_cache_entry(entry: Path, names: list[str], *, rebuilt: bool = False):
    """(stats, [dataset or None per name]) of a cache entry. An entry that fails to load (a truncated Arrow file, a
    damaged stats.json) is named, moved aside as ``<key>.damaged-<time>`` and None returned, so the caller rebuilds
    it once; when the entry just ``rebuilt`` fails too, a DataError names the file."""
    import datasets

    try:
        stats = json.loads((entry / "stats.json").read_text())
        return stats, [datasets.load_from_disk(str(entry / n)) if (entry / n).exists() else None for n in names]
    except Exception as e:  # noqa: BLE001 - pyarrow, datasets and json each raise their own kind
        bad = damaged_file(entry) or entry
        if rebuilt:
            raise DataError(f"data cache entry {entry} fails to load even when just rebuilt: {bad}: "
                            f"{' '.join(str(e).split())[:200]} (is the disk full or failing?)") from None
        aside = entry.with_name(f"{entry.name}.damaged-{time.time_ns()}")
        try:
            os.replace(entry, aside)
        except FileNotFoundError:
            pass  # another rank moved it already
        print(f"[emoe-llm] warning: data cache entry {entry} failed to load ({bad}: "
              f"{' '.join(str(e).split())[:200]}); moved it to {aside.name}, rebuilding it", flush=True)
        return None


def damaged_file(entry: Path) -> Path | None:
    """The first file of a cache entry that does not read back whole: stats.json as JSON, each Arrow file to its
    end (datasets' save_to_disk writes Arrow IPC streams)."""
    import pyarrow as pa

    try:
        json.loads((entry / "stats.json").read_text())
    except (OSError, ValueError):
        return entry / "stats.json"
    for path in sorted(entry.rglob("*.arrow")):
        try:
            with pa.memory_map(str(path)) as f:
                pa.ipc.open_stream(f).read_all()
        except (OSError, pa.ArrowException):
            return path
    return None


def tokenize_source(src: DataSource, cfg: DataConfig, tokenizer, *, get_template, key: str, cache_dir: Path):
    """Tokenized rows of one source (columns input_ids, labels) and its stats; cached on disk under ``key``.

    ``get_template()`` returns the Jinja source; it is only called for chat sources.
    """
    entry = cache_dir / "tokenized" / key
    if (entry / "stats.json").exists():
        hit = load_cache_entry(entry, ["dataset"])
        if hit is not None:  # None: it was damaged, is set aside now, and is rebuilt below
            stats, (ds,) = hit
            stats["cache_hit"] = True
            return ds, stats

    t0 = time.time()
    (cache_dir / "tokenized").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=key + ".work-", dir=cache_dir / "tokenized") as work:
        raw, fmt, report = stream_source(src, cfg, Path(work))
        is_text = fmt == "text"
        template = None if is_text else get_template()
        enc = raw.map(
            encode_batch, batched=True, batch_size=256, remove_columns=raw.column_names, num_proc=cfg.num_proc,
            fn_kwargs=dict(tokenizer=tokenizer, template=template, is_text=is_text,
                           train_on_prompt=cfg.train_on_prompt, max_seq_len=cfg.max_seq_len,
                           truncation=cfg.truncation),
            desc=f"tokenizing {src.hub or Path(src.path).name}", cache_file_name=str(Path(work) / "encoded.arrow"),
            features=_token_features("input_ids", "labels", extra={"length": "int64", "status": "int64"}),
        )
        stats, enc = _encode_stats(src, fmt, report, raw, enc, cfg, t0)
        _atomic_save({"dataset": enc}, stats, entry)
    stats["cache_hit"] = False
    return load_cache_entry(entry, ["dataset"], rebuilt=True)[1][0], stats


def _source_rows(path, fmt, report_file, **options):
    """Generator for ``Dataset.from_generator``: validated rows; the read report goes to ``report_file`` at the end
    (the generator may run in a worker, so it cannot hand back a dict)."""
    report: dict = {}
    yield from iter_records(path, fmt, report=report, **options)
    Path(report_file).write_text(json.dumps(report))


def stream_source(src: DataSource, cfg: DataConfig, work: Path):
    """One source read row by row into a memory-mapped Arrow table under ``work`` (never a Python list, so files
    larger than RAM work). Returns (dataset, format, read report). A bad row raises the reader's DataError."""
    import datasets

    report_file = work / "read_report.json"
    try:
        raw = datasets.Dataset.from_generator(
            _source_rows, cache_dir=str(work / "raw"), writer_batch_size=WRITER_BATCH, keep_in_memory=False,
            gen_kwargs=dict(path=src.path, fmt=src.format, report_file=str(report_file), max_rows=src.max_rows,
                            skip_bad_rows=cfg.skip_bad_rows, system_prompt=cfg.system_prompt,
                            empty_response=cfg.empty_response,
                            variation_seed=cfg.seed if cfg.template_variation else None,
                            variation=cfg.template_variation, load_args=src.load_args()))
    except datasets.exceptions.DatasetGenerationError as e:
        cause = e.__cause__
        while cause is not None and not isinstance(cause, DataError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise
    report = json.loads(report_file.read_text())
    return raw, report.pop("format"), report


def _encode_stats(src, fmt, report, raw, enc, cfg, t0):
    """Stats of one encoded source, and the source with dropped rows filtered out."""
    table = enc.data
    status = table.column("status").to_numpy()
    lengths = table.column("length").to_numpy()
    stats = {
        "path": src.path, "format": fmt, **report,
        "examples": int(len(raw)),
        "kept": int((status == KEPT).sum() + (status == TRUNCATED).sum()),
        "truncated": int((status == TRUNCATED).sum()),
        "dropped_too_long": int((status == DROPPED_TOO_LONG).sum()),
        "dropped_no_target": int((status == DROPPED_NO_TARGET).sum()),
        "lengths_untruncated": lengths[lengths > 0].tolist(),
        "tokenize_seconds": round(time.time() - t0, 2),
    }
    keep = (status == KEPT) | (status == TRUNCATED)
    if not keep.all():  # an indices mapping; nothing to do (and no copy) when every row is kept
        enc = enc.select(np.flatnonzero(keep))
    enc = enc.remove_columns(["status", "length"])
    if len(enc) == 0:
        raise ValueError(f"{src.path}: every row was dropped (max_seq_len={cfg.max_seq_len}, "
                         f"truncation={cfg.truncation!r}): {stats['dropped_too_long']} too long, "
                         f"{stats['dropped_no_target']} without any target token after truncation")
    return stats, enc


def _split(ds, fraction: float, seed: int):
    if fraction <= 0 or len(ds) < 2:
        return ds, None
    n_eval = min(max(1, int(round(len(ds) * fraction))), len(ds) - 1)  # keep at least one training row
    perm = np.random.default_rng(seed).permutation(len(ds))
    return (ds.select(np.sort(perm[n_eval:]), keep_in_memory=True),
            ds.select(np.sort(perm[:n_eval]), keep_in_memory=True))


def mix_counts(sizes: list[int], weights: list[float | None]) -> list[int]:
    """Rows taken from each source: the mix has sum(sizes) rows, shared in proportion to the weights
    (no weights = every source at its natural size)."""
    if len(sizes) == 1 or all(w is None for w in weights):
        return list(sizes)
    total, wsum = sum(sizes), sum(weights)
    return [max(1, int(round(total * w / wsum))) for w in weights]


def _take(ds, count: int, rng: np.random.Generator):
    """``count`` rows of ``ds``: a seeded subset, or whole copies plus a seeded remainder when upsampling."""
    n = len(ds)
    reps, rem = divmod(count, n)
    idx = np.concatenate([np.tile(np.arange(n), reps), np.sort(rng.permutation(n)[:rem])]) if count != n else None
    return ds if idx is None else ds.select(idx, keep_in_memory=True)  # an indices mapping only


class _ListColumn:
    """A list column of a dataset read straight from its (memory-mapped) Arrow buffers: lengths from the offsets
    alone, and the tokens of chosen rows as numpy, through the dataset's indices mapping (shuffle/select) if any.
    Nothing is copied but the rows asked for."""

    def __init__(self, ds, column: str):
        chunks = [c for c in ds.data.column(column).chunks if len(c)]
        self.offsets = [c.offsets.to_numpy() for c in chunks]
        self.values = [c.values.to_numpy(zero_copy_only=False) for c in chunks]
        self.first = np.cumsum([0] + [len(c) for c in chunks])  # first physical row of every chunk
        self.indices = None if ds._indices is None else ds._indices.column(0).to_numpy().astype(np.int64)

    def _physical(self, rows: np.ndarray) -> np.ndarray:
        return rows if self.indices is None else self.indices[rows]

    def lengths(self) -> np.ndarray:
        parts = [np.diff(o).astype(np.int64) for o in self.offsets]
        n = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        return n if self.indices is None else n[self.indices]

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """The values of ``rows`` (logical row numbers), back to back."""
        phys = self._physical(np.asarray(rows, dtype=np.int64))
        chunk = np.searchsorted(self.first, phys, side="right") - 1
        local = phys - self.first[chunk]
        parts = []
        for c, i in zip(chunk.tolist(), local.tolist()):
            off = self.offsets[c]
            parts.append(self.values[c][off[i]:off[i + 1]])
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


def _arrow_batches(ds, column: str, batch_size: int = 1_000):
    """One column in record batches: bounded memory even through a shuffle/select indices mapping (taking the whole
    column at once would materialise every token of the dataset in RAM)."""
    for batch in ds.select_columns([column]).with_format("arrow").iter(batch_size=batch_size):
        yield batch[column]


def _list_lengths(ds, column: str = "input_ids") -> np.ndarray:
    return _ListColumn(ds, column).lengths()


def _count_targets(ds) -> int:
    import pyarrow.compute as pc

    return sum(int(pc.sum(pc.not_equal(pc.list_flatten(col), IGNORE_INDEX)).as_py() or 0)
               for col in _arrow_batches(ds, "labels"))


def _rows_of(matrix: np.ndarray):
    """A (rows, seq_len) numpy array as an Arrow list<int32> column."""
    import pyarrow as pa

    n, width = matrix.shape
    offsets = pa.array(np.arange(0, n * width + 1, width, dtype=np.int32), type=pa.int32())
    return pa.ListArray.from_arrays(offsets, pa.array(matrix.reshape(-1), type=pa.int32()))


def _with_positions(batch):
    """``Dataset.map`` on the arrow format: adds position_ids 0..n-1 to every row, with numpy."""
    import pyarrow as pa

    ids = batch.column("input_ids").combine_chunks()
    offsets = ids.offsets.to_numpy().astype(np.int64)
    offsets -= offsets[0]
    lengths = np.diff(offsets)
    positions = np.arange(int(offsets[-1]), dtype=np.int64) - np.repeat(offsets[:-1], lengths)
    column = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32), type=pa.int32()),
                                      pa.array(positions.astype(np.int32), type=pa.int32()))
    return pa.table({"input_ids": batch.column("input_ids"), "labels": batch.column("labels"), "position_ids": column})


def _pack(ds, cfg: DataConfig, pad_token_id: int, seed: int, work: Path):
    import datasets

    ids_col, labels_col = _ListColumn(ds, "input_ids"), _ListColumn(ds, "labels")
    lengths = ids_col.lengths()
    bin_of, _ = best_fit_bins(lengths, cfg.max_seq_len)
    n_rows = int(bin_of.max()) + 1 if len(bin_of) else 0
    # Rows in a seeded order, each row's documents in index order: row r = sorted(pack_lengths(...)[order[r]]).
    order = np.random.default_rng(seed).permutation(n_rows)
    rank = np.empty(n_rows, dtype=np.int64)
    rank[order] = np.arange(n_rows)
    row_of_doc = rank[bin_of]
    docs = np.argsort(row_of_doc, kind="stable")  # stable: index order within a row
    docs_per_row = np.bincount(row_of_doc, minlength=n_rows)
    del bin_of, rank, row_of_doc
    first_doc = np.concatenate([[0], np.cumsum(docs_per_row)])  # row r packs docs[first_doc[r]:first_doc[r + 1]]

    def build(batch):
        import pyarrow as pa

        r0, r1 = batch["row"][0], batch["row"][-1] + 1  # batches are contiguous runs of rows
        d = docs[first_doc[r0]:first_doc[r1]]
        packed = pack_arrays(ids_col.gather(d), labels_col.gather(d), lengths[d], docs_per_row[r0:r1],
                             seq_len=cfg.max_seq_len, pad_token_id=pad_token_id)
        return pa.table({k: _rows_of(v) for k, v in packed.items()})

    rows = datasets.Dataset.from_dict({"row": np.arange(len(docs_per_row))})
    # new_fingerprint: `build` closes over the memory-mapped columns, which datasets must not try to hash.
    packed = rows.map(build, batched=True, batch_size=PACK_BATCH, remove_columns=["row"], desc="packing",
                      features=_token_features("input_ids", "labels", "position_ids"),
                      cache_file_name=str(work / "packed.arrow"),
                      new_fingerprint=hashlib.sha256(str(work).encode()).hexdigest()[:16])
    return packed, int(lengths.sum()) / max(1, len(docs_per_row) * cfg.max_seq_len)


def _summary(ds, n_doc_tokens: int, lengths: list[int]) -> dict:
    tokens = n_doc_tokens  # document tokens, padding of packed rows excluded
    targets = _count_targets(ds)
    q = np.percentile(lengths, [50, 90, 95, 99]).tolist() if lengths else [0, 0, 0, 0]
    return {
        "rows": len(ds), "tokens": tokens, "row_tokens": int(_list_lengths(ds).sum()), "target_tokens": targets,
        "target_fraction": round(targets / max(1, tokens), 4),
        "length_p50": q[0], "length_p90": q[1], "length_p95": q[2], "length_p99": q[3],
        "length_max": int(max(lengths)) if lengths else 0,
    }


def _finish(parts: list, cfg: DataConfig, tokenizer, seed: int, work: Path):
    """Concatenate, shuffle (seeded) and pack or add position ids. Returns (dataset, documents, doc tokens, packing
    efficiency). Intermediate files go to ``work`` (a temp dir), never into the tokenized cache entries."""
    import datasets

    ds = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    ds = ds.shuffle(seed=seed, keep_in_memory=True)  # an indices mapping only
    n_docs, n_doc_tokens = len(ds), int(_list_lengths(ds).sum())
    work.mkdir(parents=True, exist_ok=True)
    if cfg.packing:
        ds, efficiency = _pack(ds, cfg, tokenizer.pad_token_id, seed, work)
    else:
        ds = ds.with_format("arrow").map(
            _with_positions, batched=True, desc="position ids", cache_file_name=str(work / "rows.arrow"),
            features=_token_features("input_ids", "labels", "position_ids"),
            new_fingerprint=hashlib.sha256(str(work).encode()).hexdigest()[:16]).with_format(None)
        efficiency = None
    return ds, n_docs, n_doc_tokens, efficiency


def build_sft_datasets(cfg: DataConfig, tokenizer):
    """Build the training (and optional eval) datasets.

    Returns:
        train: ``datasets.Dataset`` with rows ``{"input_ids", "labels", "position_ids"}`` (lists of ints; labels -100
            where no loss is taken; ``labels[0] == -100`` for every document). Packed rows are exactly
            ``max_seq_len`` long (each padded at the end with pad tokens, labels -100, as their own position segment).
        eval: the same for the held-out split / eval_sources, or None.
        stats: rows, tokens, truncated, dropped, skipped_bad_rows, length percentiles (of documents before
            truncation), target_fraction, packing_efficiency, cache_hit and per-source details.
    """
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; load it with emoe_llm.data.load_tokenizer")
    for src in cfg.sources + cfg.eval_sources:
        resolve_hub_source(src)  # a no-op once the run resolved them (train: resolve_hub_ids)
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    tok_fp = tokenizer_fingerprint(tokenizer)
    template_cache: dict = {}

    def get_template():
        # Text-only runs must not require a chat template; resolve lazily and once.
        if "t" not in template_cache:
            template_cache["t"] = resolve_template(cfg.template, tokenizer)
        return template_cache["t"][1]

    template_identity = _template_identity(cfg, tokenizer)
    train_keys = [_cache_key(src, cfg, tok_fp, template_identity) for src in cfg.sources]
    eval_keys = [_cache_key(src, cfg, tok_fp, template_identity) for src in cfg.eval_sources]
    final_key = hashlib.sha256(json.dumps({
        "v": PIPELINE_VERSION, "train": [(k, s.weight) for k, s in zip(train_keys, cfg.sources)], "eval": eval_keys,
        "eval_fraction": cfg.eval_fraction, "seed": cfg.seed, "packing": cfg.packing, "max_seq_len": cfg.max_seq_len,
        "pad": tokenizer.pad_token_id,
    }, sort_keys=True).encode()).hexdigest()[:24]
    final = cache_dir / "final" / final_key
    if (final / "stats.json").exists():
        hit = load_cache_entry(final, ["train", "eval"])
        if hit is not None:
            stats, (train, eval_ds) = hit
            stats["cache_hit"] = True
            return train, eval_ds, stats

    def load(sources, keys):
        return [(src, *tokenize_source(src, cfg, tokenizer, get_template=get_template, key=key, cache_dir=cache_dir))
                for src, key in zip(sources, keys)]

    loaded = load(cfg.sources, train_keys)
    train_parts, eval_parts = [], []
    for i, (src, ds, st) in enumerate(loaded):
        tr, ev = _split(ds, 0.0 if cfg.eval_sources else cfg.eval_fraction, cfg.seed + i)
        train_parts.append(tr)
        if ev is not None:
            eval_parts.append(ev)
    counts = mix_counts([len(p) for p in train_parts], [s.weight for s in cfg.sources])
    rng = np.random.default_rng(cfg.seed)
    train_parts = [_take(p, c, rng) for p, c in zip(train_parts, counts)]
    eval_loaded = load(cfg.eval_sources, eval_keys)
    eval_parts += [ds for _, ds, _ in eval_loaded]

    (cache_dir / "final").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="work-", dir=cache_dir / "final") as work:
        train, n_docs, n_doc_tokens, train_eff = _finish(train_parts, cfg, tokenizer, cfg.seed, Path(work) / "train")
        eval_ds = None
        if eval_parts:
            eval_ds, _, _, _ = _finish(eval_parts, cfg, tokenizer, cfg.seed, Path(work) / "eval")

        per_source = []
        for (src, _, st), count in zip(loaded, counts):
            per_source.append({k: v for k, v in st.items() if k != "lengths_untruncated"}
                              | {"rows_in_mix": count, "weight": src.weight})
        all_src = [st for _, _, st in loaded + eval_loaded]
        untrunc = [n for _, _, st in loaded for n in st["lengths_untruncated"]]
        stats = _summary(train, n_doc_tokens, untrunc)
        stats.update({
            "documents": n_docs,
            "truncated": sum(s["truncated"] for s in all_src),
            "dropped": sum(s["dropped_too_long"] + s["dropped_no_target"] for s in all_src),
            "dropped_too_long": sum(s["dropped_too_long"] for s in all_src),
            "dropped_no_target": sum(s["dropped_no_target"] for s in all_src),
            "skipped_bad_rows": sum(s["skipped_bad_rows"] for s in all_src),
            "filtered_label_false": sum(s["filtered_label_false"] for s in all_src),
            "empty_response": cfg.empty_response,
            "empty_responses": sum(s.get("empty_responses", 0) for s in all_src),
            "bad_row_examples": [e for s in all_src for e in s["bad_row_examples"]][:5],
            "packing": cfg.packing, "packing_efficiency": None if train_eff is None else round(train_eff, 4),
            "eval_rows": 0 if eval_ds is None else len(eval_ds),
            "template": None if all(st["format"] == "text" for st in all_src) else
            (template_cache.get("t") or resolve_template(cfg.template, tokenizer))[0],
            "sources": per_source,
            "tokenize_cache_hit": all(s["cache_hit"] for s in all_src),
            "cache_dir": str(cache_dir),
            "cache_key": final_key,
        })
        _atomic_save({"train": train, "eval": eval_ds}, stats, final)
    _, (train, eval_ds) = load_cache_entry(final, ["train", "eval"], rebuilt=True)
    stats["cache_hit"] = False
    return train, eval_ds, stats
