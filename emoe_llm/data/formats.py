"""Read data files and normalise every row to ``{"messages": [{role, content}, ...]}`` or ``{"text": str}``.

All validation happens here, before any tokenization, so a bad file fails in seconds with an error that names the
file, the row (0-based index; ``line N`` is 1-based for .jsonl/.txt) and the field.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterator

ROLES = ("system", "user", "assistant")
# ShareGPT speaker names seen in the wild -> our roles.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bard": "assistant", "model": "assistant"}
TEXT_SUFFIXES = (".txt",)
JSON_SUFFIXES = (".json", ".jsonl", ".ndjson")


class DataError(ValueError):
    """Malformed input; the message names the file, the row and the field."""

    def __init__(self, message: str, *, path: str | None = None, row: int | None = None, field: str | None = None):
        super().__init__(message)
        self.path, self.row, self.field = path, row, field


class DataFileNotFoundError(DataError, FileNotFoundError):
    pass


def _where(path: str, row: int, line_based: bool) -> str:
    return f"{path}: line {row + 1}" if line_based else f"{path}: row {row}"


# --------------------------------------------------------------------------------------------------- raw reading


DATA_SUFFIXES = (".json", ".jsonl", ".ndjson", ".csv", ".parquet", ".arrow", ".txt")
# Compressed JSON / CSV / text, as datasets reads them: decompressed as a stream, never whole into memory.
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
KINDS = {".json": "JSON", ".jsonl": "JSON", ".ndjson": "JSON", ".csv": "CSV", ".parquet": "Parquet",
         ".arrow": "Arrow", ".txt": "text"}
SAVE_TO_DISK_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")  # what datasets.save_to_disk writes


def data_suffix(path: str | Path) -> tuple[str, str | None]:
    """(data suffix, compression or None): ``x.jsonl.gz`` -> (".jsonl", ".gz"); ``x.csv`` -> (".csv", None)."""
    suffixes = [x.lower() for x in Path(path).suffixes]
    if len(suffixes) >= 2 and suffixes[-1] in COMPRESSIONS:
        return suffixes[-2], suffixes[-1]
    return (suffixes[-1] if suffixes else ""), None


def is_data_file(path: Path) -> bool:
    suffix, compression = data_suffix(path)
    return suffix in DATA_SUFFIXES and (compression is None or suffix not in (".parquet", ".arrow"))


def source_files(path: str) -> list[str]:
    """The files one source reads: a data file or a ``save_to_disk`` dir is itself; any other directory is read as
    all its data files (``DATA_SUFFIXES``, optionally compressed; not recursive, hidden files left out), in sorted
    order. One directory holds one kind of file (JSON, CSV, Parquet, Arrow or text): a mix is an error naming the
    odd file, since every file of a directory is one dataset with one set of columns."""
    p = Path(path)
    if not p.is_dir() or any((p / name).is_file() for name in SAVE_TO_DISK_FILES):
        return [path]
    files = sorted(str(f) for f in p.iterdir() if f.is_file() and not f.name.startswith(".") and is_data_file(f))
    if not files:
        raise DataError(f"{path}: a directory without data files ({', '.join(DATA_SUFFIXES)}, optionally "
                        f"{'/'.join(COMPRESSIONS)}) that is not a datasets.save_to_disk directory either", path=path)
    kinds = [KINDS[data_suffix(f)[0]] for f in files]
    for f, kind in zip(files, kinds):
        if kind != kinds[0]:
            raise DataError(f"{f}: a {kind} file in a directory of {kinds[0]} files (first: {Path(files[0]).name}); "
                            "one directory is one dataset: move it out or give it as its own source", path=f)
    return files


def open_binary(path: str):
    """The file as a binary stream, decompressed by its last suffix (.gz, .bz2, .xz, .zst) when it has one."""
    compression = data_suffix(path)[1]
    if compression == ".gz":
        import gzip

        return gzip.open(path, "rb")
    if compression == ".bz2":
        import bz2

        return bz2.open(path, "rb")
    if compression == ".xz":
        import lzma

        return lzma.open(path, "rb")
    if compression == ".zst":
        try:
            import zstandard
        except ImportError:
            raise DataError(f"{path}: reading .zst needs the zstandard package (pip install zstandard)",
                            path=path) from None
        import io

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def _read_all(path: str) -> bytes:
    try:
        with open_binary(path) as f:
            return f.read()
    except (OSError, EOFError, ValueError) as e:  # gzip/bz2/lzma/zstd raise these for a corrupt or truncated file
        raise DataError(f"{path}: cannot decompress ({e})", path=path) from None


def _lines(path: str, f):
    """Byte lines of an open (maybe decompressing) file; a corrupt compressed stream is one error naming the file."""
    try:
        yield from f
    except (OSError, EOFError, ValueError) as e:
        raise DataError(f"{path}: cannot decompress ({e})", path=path) from None


def iter_dataset_rows(path: str, load_args: dict, *, max_rows: int | None = None):
    """Rows of a dataset repo (a Hub snapshot dir or a local repo dir) through ``datasets.load_dataset``: it reads the
    repo's README configs and data-file layout, so ``name`` (the subset) and ``split`` mean what they mean on the
    Hub."""
    import datasets

    try:
        ds = datasets.load_dataset(path, **{k: v for k, v in load_args.items() if v is not None})
    except Exception as e:  # noqa: BLE001 - re-raised with the repo and the split asked for
        what = ", ".join(f"{k} {v!r}" for k, v in load_args.items() if v is not None)
        raise DataError(f"{path}: datasets.load_dataset({what}) failed: {str(e).splitlines()[0]}", path=path) from e
    n = len(ds) if max_rows is None else min(len(ds), max_rows)
    for i in range(n):
        yield i, ds[i], False


def iter_raw_rows(path: str, *, max_rows: int | None = None) -> Iterator[tuple[int, object, bool]]:
    """Yield ``(row_index, record_or_DataError, line_based)`` from a file or a ``save_to_disk`` directory.

    A JSON syntax error on a .jsonl line is yielded as a DataError (so ``skip_bad_rows`` can skip it); errors that
    make the whole file unreadable are raised.
    """
    p = Path(path)
    if not p.exists():
        raise DataFileNotFoundError(f"{path}: file not found (relative paths resolve against {os.getcwd()})", path=path)
    count = 0
    if p.is_dir():
        import datasets

        try:
            ds = datasets.load_from_disk(str(p))
        except Exception as e:  # noqa: BLE001 - re-raised with the path
            raise DataError(f"{path}: not a datasets.save_to_disk directory ({e})", path=path) from e
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise DataError(f"{path}: DatasetDict without a 'train' split (splits: {list(ds)})", path=path)
            ds = ds["train"]
        n = len(ds) if max_rows is None else min(len(ds), max_rows)
        for i in range(n):
            yield i, ds[i], False
        return
    suffix, compression = data_suffix(p)
    if compression and suffix in (".parquet", ".arrow"):
        raise DataError(f"{path}: a compressed {suffix} file; {suffix} compresses its own columns, give it "
                        "uncompressed", path=path)
    if suffix in (".jsonl", ".ndjson"):
        with open_binary(path) as f:
            yield from iter_jsonl_lines(path, decode_lines(path, _lines(path, f)), max_rows)
    elif suffix == ".json":
        raw = _read_all(path)
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            if raw.lstrip().startswith(b"{") and b"\n" in raw.strip():  # JSON lines: only that line is bad
                yield from iter_jsonl_lines(path, decode_lines(path, raw.splitlines(keepends=True)), max_rows)
                return
            raise _not_utf8(path, raw, e) from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            # A .json file may also be JSON lines (LLaMA-Factory accepts both): try that before failing.
            if text.lstrip().startswith("{") and "\n" in text.strip():
                yield from iter_jsonl_lines(path, text.splitlines(), max_rows)
                return
            raise DataError(f"{path}: line {e.lineno}: not valid JSON ({e.msg} at column {e.colno})",
                            path=path, row=e.lineno - 1) from e
        if isinstance(data, dict):
            # {"train": [...]} or {"data": [...]} wrappers are common; anything else is an error.
            lists = [k for k, v in data.items() if isinstance(v, list)]
            if len(lists) != 1:
                raise DataError(f"{path}: expected a JSON list of records (or an object holding exactly one list), "
                                f"got an object with keys {list(data)[:10]}", path=path)
            data = data[lists[0]]
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}", path=path)
        for i, rec in enumerate(data[:max_rows] if max_rows is not None else data):
            yield i, rec, False
    elif suffix == ".csv":
        yield from _iter_csv(path, max_rows)
    elif suffix in (".parquet", ".arrow"):
        yield from _iter_arrow_table(path, suffix, max_rows)
    elif suffix in TEXT_SUFFIXES:
        with open_binary(path) as f:
            for i, line in enumerate(decode_lines(path, _lines(path, f))):
                if max_rows is not None and count >= max_rows:
                    return
                if isinstance(line, DataError):
                    count += 1
                    yield i, line, True  # skippable with skip_bad_rows, like a bad JSON line
                    continue
                line = line.rstrip("\r\n")
                if not line.strip():
                    continue  # blank lines separate nothing in one-doc-per-line corpora
                count += 1
                yield i, {"text": line}, True
    else:
        raise DataError(f"{path}: unsupported file type {''.join(Path(path).suffixes[-2:]) or '(none)'!r}; expected "
                        f"{', '.join(DATA_SUFFIXES)} (JSON, CSV and text also {'/'.join(COMPRESSIONS)}-compressed) or "
                        "a datasets.save_to_disk directory", path=path)


def _iter_csv(path: str, max_rows: int | None):
    """CSV with a header row; every value is a string (an empty `input` cell is ""), as the alpaca columns expect.
    Rows are numbered like the other non-line formats: row 0 is the first record after the header."""
    import csv
    import io

    with open_binary(path) as f:
        text = io.TextIOWrapper(f, encoding="utf-8-sig", newline="")
        try:
            reader = csv.DictReader(text)
            for i, rec in enumerate(reader):
                if max_rows is not None and i >= max_rows:
                    return
                if None in rec:  # more cells than the header names
                    yield i, DataError(f"{path}: row {i}: {len(rec) - 1 + len(rec[None])} cells, the header names "
                                       f"{len(reader.fieldnames)}", path=path, row=i), False
                    continue
                yield i, rec, False
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e.reason}); re-save the file as UTF-8", path=path) from None
        except (csv.Error, OSError, EOFError) as e:
            raise DataError(f"{path}: not a readable CSV file ({e})", path=path) from None


def _iter_arrow_table(path: str, suffix: str, max_rows: int | None):
    """Parquet, or an Arrow IPC file (datasets' own .arrow cache files are IPC streams), in record batches."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if suffix == ".parquet":
            batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
        else:
            source = pa.memory_map(path)
            try:
                batches = iter(pa.ipc.open_stream(source))
            except pa.ArrowInvalid:
                source.seek(0)
                reader = pa.ipc.open_file(source)
                batches = (reader.get_batch(k) for k in range(reader.num_record_batches))
    except Exception as e:  # noqa: BLE001
        kind = "parquet" if suffix == ".parquet" else "Arrow IPC"
        raise DataError(f"{path}: not a readable {kind} file ({e})", path=path) from e
    i = 0
    for batch in batches:
        for rec in batch.to_pylist():
            if max_rows is not None and i >= max_rows:
                return
            yield i, rec, False
            i += 1


def decode_lines(path: str, lines) -> Iterator[str | DataError]:
    """UTF-8-decode byte lines one at a time: an undecodable line becomes a DataError naming file and line (so
    ``skip_bad_rows`` can skip just that line) instead of a codec error for the whole file."""
    for i, raw in enumerate(lines):
        try:
            yield raw.decode("utf-8-sig" if i == 0 else "utf-8")
        except UnicodeDecodeError as e:
            yield DataError(f"{path}: line {i + 1}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                            f"{e.start + 1}); re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8) or skip such "
                            "rows (--skip-bad-rows)", path=path, row=i)


def _not_utf8(path: str, raw: bytes, e: UnicodeDecodeError) -> DataError:
    line = raw[: e.start].count(b"\n")
    column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
    return DataError(f"{path}: line {line + 1}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {column}); "
                     "re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)", path=path, row=line)


def iter_jsonl_lines(path: str, lines, max_rows: int | None):
    """(line index, parsed record or a DataError naming the line, True) for each non-blank JSON line."""
    count = 0
    for i, line in enumerate(lines):
        if max_rows is not None and count >= max_rows:
            return
        if isinstance(line, DataError):
            count += 1
            yield i, line, True
            continue
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            rec = DataError(f"{path}: line {i + 1}: not valid JSON ({e.msg} at column {e.colno})", path=path, row=i)
        count += 1
        yield i, rec, True


# --------------------------------------------------------------------------------------------- format detection


def detect_format(path: str, first_record) -> str:
    if data_suffix(path)[0] in TEXT_SUFFIXES:
        return "text"
    if not isinstance(first_record, dict):
        raise DataError(f"{path}: cannot detect the format: first row is {type(first_record).__name__}, not an object",
                        path=path, row=0)
    keys = set(first_record)
    for key, fmt in (("conversations", "sharegpt"), ("messages", "messages"), ("instruction", "alpaca"),
                     ("text", "text")):
        if key in keys:
            return fmt
    raise DataError(f"{path}: cannot detect the format from the first row's keys {sorted(keys)}; expected "
                    "`conversations` (sharegpt), `messages` (OpenAI), `instruction`/`output` (alpaca) or `text`; "
                    "or set `format:` on the source", path=path, row=0)


# ------------------------------------------------------------------------------------------------ normalisation


def _require_str(rec: dict, key: str, where: str, *, allow_empty: bool = True) -> str:
    if key not in rec or rec[key] is None:
        raise DataError(f"{where}: missing field {key!r}", field=key)
    val = rec[key]
    if not isinstance(val, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(val).__name__}", field=key)
    if not allow_empty and not val.strip():
        raise DataError(f"{where}: field {key!r} is empty", field=key)
    return val


class EmptyResponse(DataError):
    """A row whose response is empty (``data.empty_response`` decides: error, skip or train EOS-only)."""


def _alpaca(rec: dict, where: str) -> list[dict]:
    instruction = _require_str(rec, "instruction", where, allow_empty=False)
    inp = rec.get("input") or ""
    if not isinstance(inp, str):
        raise DataError(f"{where}: field 'input' must be a string, got {type(inp).__name__}", field="input")
    output = _require_str(rec, "output", where)
    user = f"{instruction}\n\n{inp}" if inp.strip() else instruction
    messages = []
    # LLaMA-Factory's optional `history`: earlier [instruction, response] pairs of the same conversation.
    history = rec.get("history") or []
    if not isinstance(history, list):
        raise DataError(f"{where}: field 'history' must be a list of [instruction, response] pairs", field="history")
    for j, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise DataError(f"{where}: history[{j}] must be a pair of strings [instruction, response]",
                            field=f"history[{j}]")
        messages += [{"role": "user", "content": pair[0], "_field": f"history[{j}][0]"},
                     {"role": "assistant", "content": pair[1], "_field": f"history[{j}][1]"}]
    # instruction/input stay separate for the official Alpaca prompt (which lays out an `### Input:` block; like
    # stanford_alpaca, any non-empty input counts); other templates read `content`.
    messages += [{"role": "user", "content": user, "instruction": instruction, "input": inp},
                 {"role": "assistant", "content": output, "_field": "output"}]
    system = rec.get("system")
    if isinstance(system, str) and system.strip():
        messages.insert(0, {"role": "system", "content": system})
    return messages


def _turns(rec: dict, where: str, list_key: str, role_key: str, content_key: str, role_map: dict) -> list[dict]:
    if list_key not in rec or rec[list_key] is None:
        raise DataError(f"{where}: missing field {list_key!r}", field=list_key)
    turns = rec[list_key]
    if not isinstance(turns, list):
        raise DataError(f"{where}: field {list_key!r} must be a list, got {type(turns).__name__}", field=list_key)
    messages = []
    for j, turn in enumerate(turns):
        fld = f"{list_key}[{j}]"
        if not isinstance(turn, dict):
            raise DataError(f"{where}: {fld} must be an object, got {type(turn).__name__}", field=fld)
        for key in (role_key, content_key):
            if key not in turn or turn[key] is None:
                raise DataError(f"{where}: missing field {key!r} in {fld}", field=f"{fld}.{key}")
        role_raw, content = turn[role_key], turn[content_key]
        role = role_map.get(role_raw) if isinstance(role_raw, str) else None
        if role is None:
            raise DataError(f"{where}: unknown role {role_raw!r} in {fld}.{role_key}; expected one of "
                            f"{sorted(role_map)}", field=f"{fld}.{role_key}")
        if isinstance(content, list):  # OpenAI content parts: keep the text ones, refuse images/audio
            texts = []
            for k, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise DataError(f"{where}: {fld}.{content_key}[{k}] is not a text part; only "
                                    "{'type': 'text', 'text': ...} parts are supported", field=f"{fld}.{content_key}")
                texts.append(part["text"])
            content = "\n".join(texts)
        if not isinstance(content, str):
            raise DataError(f"{where}: {fld}.{content_key} must be a string, got {type(content).__name__}",
                            field=f"{fld}.{content_key}")
        messages.append({"role": role, "content": content, "_field": f"{fld}.{content_key}"})
    return messages


def validate_conversation(messages: list[dict], where: str, *, allow_empty_response: bool = False) -> list[dict]:
    """Check the turn structure: [system], user, assistant, user, assistant, ...; ends with an assistant turn, and
    (unless ``allow_empty_response``) every assistant turn is non-empty."""
    if not messages:
        raise DataError(f"{where}: empty conversation")
    start = 1 if messages[0]["role"] == "system" else 0
    if start == 1 and len(messages) == 1:
        raise DataError(f"{where}: conversation has only a system turn")
    for j, m in enumerate(messages[start:], start):
        expected = "user" if (j - start) % 2 == 0 else "assistant"
        if m["role"] != expected:
            fld = m.get("_field", f"message {j}")
            raise DataError(f"{where}: turn {j} ({fld}) has role {m['role']!r} but {expected!r} was expected "
                            "(turns must alternate user/assistant after an optional leading system turn)", field=fld)
        if m["role"] == "assistant" and not m["content"].strip() and not allow_empty_response:
            fld = m.get("_field", f"message {j}")
            raise EmptyResponse(f"{where}: empty response in turn {j} ({fld}); set data.empty_response to 'eos' "
                                "(train EOS-only, as the official Alpaca code) or 'skip'", field=fld)
    if messages[-1]["role"] != "assistant":
        fld = messages[-1].get("_field", f"message {len(messages) - 1}")
        turn = fld.rsplit(".", 1)[0]  # messages[2].content -> messages[2]: it is the turn's role that is wrong
        raise DataError(f"{where}: conversation does not end with an assistant turn (the last turn, {turn}, has "
                        f"role {messages[-1]['role']!r}); end it with the assistant's answer or drop the row",
                        field=fld)
    keep = ("role", "content", "instruction", "input")
    return [{k: m[k] for k in keep if k in m} for m in messages]


def normalize_record(rec, fmt: str, where: str, system_prompt: str | None = None, *,
                     allow_empty_response: bool = False) -> dict | None:
    """One raw record -> ``{"messages": [...]}`` / ``{"text": ...}``, or None for rows filtered out on purpose."""
    if isinstance(rec, DataError):
        raise rec
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if fmt == "text":
        text = _require_str(rec, "text", where)
        if not text.strip():
            raise DataError(f"{where}: field 'text' is empty", field="text")
        return {"text": text}
    # KTO-style files mark undesirable replies with label=false; they are not SFT targets.
    if isinstance(rec.get("label"), bool) and rec["label"] is False:
        return None
    if fmt == "alpaca":
        messages = _alpaca(rec, where)
    elif fmt == "sharegpt":
        messages = _turns(rec, where, "conversations", "from", "value", SHAREGPT_ROLES)
        if isinstance(rec.get("system"), str) and rec["system"].strip() and messages and \
                messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": rec["system"], "_field": "system"})
    elif fmt == "messages":
        messages = _turns(rec, where, "messages", "role", "content", {r: r for r in ROLES})
    else:
        raise ValueError(f"unknown format {fmt!r}")
    messages = validate_conversation(messages, where, allow_empty_response=allow_empty_response)
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return {"messages": messages}


def _pick(seed: int, where: str, n: int) -> int:
    """One of n, by a hash of (seed, row): reproducible, and the same on every rank."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{where}".encode()).digest()[:8], "big") % n


def _vary_prompt(messages: list[dict], variation, seed: int, where: str) -> None:
    """data.template_variation on one alpaca-format row, in place. ``True``: a system turn with one of our preamble
    variants. ``"official"``: the first user turn carries ``prompt``, the whole prompt rendered from one of the 12
    official variants (the alpaca template writes it instead of its own; later turns of a multi-turn row keep the
    fixed layout, the official code has no multi-turn rows)."""
    from .templates import ALPACA_PREAMBLE_VARIANTS, OFFICIAL_PROMPT_VARIANTS

    user = messages[0]
    has_input = bool(user.get("input"))
    if variation == "official":
        prompt_input, prompt_no_input = OFFICIAL_PROMPT_VARIANTS[_pick(seed, where, len(OFFICIAL_PROMPT_VARIANTS))]
        fields = {"instruction": user.get("instruction", user["content"]), "input": user.get("input", "")}
        user["prompt"] = (prompt_input if has_input else prompt_no_input).format_map(fields)
    else:
        pair = ALPACA_PREAMBLE_VARIANTS[_pick(seed, where, len(ALPACA_PREAMBLE_VARIANTS))]
        messages.insert(0, {"role": "system", "content": pair[int(has_input)]})


def iter_records(path: str, fmt: str = "auto", *, report: dict, max_rows: int | None = None,
                 skip_bad_rows: bool = False, system_prompt: str | None = None, empty_response: str = "error",
                 variation_seed: int | None = None, variation: bool | str = True,
                 load_args: dict | None = None) -> Iterator[dict]:
    """Read and validate one source row by row: yields normalised records (plus ``where``: "file: row N") and fills
    ``report`` (``rows_read``, ``skipped_bad_rows``, ``filtered_label_false``, ``empty_responses``,
    ``bad_row_examples``, ``format``). ``empty_responses`` counts rows with an empty response (trained EOS-only with
    ``empty_response="eos"``, left out with "skip").

    Nothing is kept in memory, so this feeds ``datasets.Dataset.from_generator`` for files larger than RAM.
    ``load_args`` (``{split, name}``) reads ``path`` as a dataset repo through ``datasets.load_dataset`` instead.
    """
    report.update({"rows_read": 0, "skipped_bad_rows": 0, "filtered_label_false": 0, "empty_responses": 0,
                   "empty_response": empty_response, "bad_row_examples": [], "format": fmt})
    kept, requested, last_file = 0, fmt, None
    for i, rec, line_based, file in _iter_source_rows(path, max_rows, load_args):
        if file != last_file:  # each file of a directory source is detected on its own
            fmt, last_file = requested, file
        where = _where(file, i, line_based)
        report["rows_read"] += 1
        try:
            if fmt == "auto":
                if isinstance(rec, DataError):
                    raise rec
                fmt = report["format"] = detect_format(file, rec)
            out = normalize_record(rec, fmt, where, system_prompt, allow_empty_response=empty_response == "eos")
            if variation_seed is not None and variation and fmt == "alpaca" and out is not None and \
                    out["messages"][0]["role"] != "system":
                _vary_prompt(out["messages"], variation, variation_seed, where)
            if empty_response == "eos" and out is not None and any(
                    m["role"] == "assistant" and not m["content"].strip() for m in out["messages"]):
                report["empty_responses"] += 1
        except DataError as e:
            if isinstance(e, EmptyResponse) and empty_response == "skip":
                report["empty_responses"] += 1
                continue
            if e.path is None:
                e.path = file
            if e.row is None:
                e.row = i
            if not skip_bad_rows:
                raise
            report["skipped_bad_rows"] += 1
            if len(report["bad_row_examples"]) < 5:
                report["bad_row_examples"].append(str(e))
            continue
        if out is None:
            report["filtered_label_false"] += 1
            continue
        out["where"] = where  # carried along so tokenization errors can name the row too
        kept += 1
        yield out
    if not kept:
        raise DataError(f"{path}: no usable rows (read {report['rows_read']}, skipped {report['skipped_bad_rows']} bad, "
                        f"{report['filtered_label_false']} with label=false)", path=path)
    if report["format"] == "auto":
        report["format"] = "text"


def _iter_source_rows(path: str, max_rows: int | None, load_args: dict | None = None):
    """(row index, record, line_based, file) over every file of the source (``source_files``), ``max_rows`` in all."""
    if load_args is not None:
        for i, rec, line_based in iter_dataset_rows(path, load_args, max_rows=max_rows):
            yield i, rec, line_based, path
        return
    left = max_rows
    for file in source_files(path):
        for i, rec, line_based in iter_raw_rows(file, max_rows=left):
            yield i, rec, line_based, file
            if left is not None:
                left -= 1
        if left is not None and left <= 0:
            return


def read_source(path: str, fmt: str = "auto", **options) -> tuple[list[dict], str, dict]:
    """Read and validate one source into a list (small files, inspection; training streams with ``iter_records``,
    which takes the same keyword options). Returns (records, resolved format, report)."""
    report: dict = {}
    records = list(iter_records(path, fmt, report=report, **options))
    return records, report.pop("format"), report
