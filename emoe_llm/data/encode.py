"""Token ids and labels for one conversation or one text document.

Labels are aligned with ``input_ids`` (HF convention: the model shifts them; logits[t] predicts labels[t+1]) and hold
-100 where no loss is taken. Rule: ``labels[0] == -100`` for every document, because nothing inside the document
predicts its first token; packed documents therefore can never be trained to predict their neighbour.
"""

from __future__ import annotations

import re
from itertools import chain

import numpy as np

IGNORE_INDEX = -100

# Row status codes produced by `encode_batch` (kept in the cache so stats can be recomputed without re-tokenizing).
KEPT, TRUNCATED, DROPPED_TOO_LONG, DROPPED_NO_TARGET = 0, 1, 2, 3


def labels_from_spans(input_ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]],
                      train_on_prompt: bool) -> list[int]:
    """A token is a target when its characters overlap a target span (a token that straddles the prompt/response
    boundary, like Llama-2's ``▁Sure`` after ``[/INST]``, is one the model must generate, so it is a target).

    Vectorised (numpy) for the usual case: non-empty tokens and sorted, disjoint, non-empty spans. Anything else
    (zero-width tokens or spans) goes through the reference loop ``_labels_from_spans_loop``; both give the same labels.
    """
    if train_on_prompt:
        labels = list(input_ids)
    else:
        n = len(input_ids)
        off = np.asarray(offsets, dtype=np.int64).reshape(n, 2)
        sp = np.asarray(spans, dtype=np.int64).reshape(len(spans), 2)
        if not (np.all(off[:, 0] < off[:, 1]) and np.all(sp[:, 0] < sp[:, 1]) and np.all(sp[1:, 0] >= sp[:-1, 1])):
            return _labels_from_spans_loop(input_ids, offsets, spans, train_on_prompt)
        # The first span ending after the token's start is the only one it can overlap (spans are sorted, disjoint).
        k = np.searchsorted(sp[:, 1], off[:, 0], side="right")
        hit = k < len(sp)
        hit[hit] = sp[k[hit], 0] < off[hit, 1]
        ids = np.asarray(input_ids, dtype=np.int64)
        labels = np.where(hit, ids, IGNORE_INDEX).tolist()
    if labels:
        labels[0] = IGNORE_INDEX
    return labels


def _labels_from_spans_loop(input_ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]],
                            train_on_prompt: bool) -> list[int]:
    """Reference implementation of ``labels_from_spans`` (one token at a time; handles zero-width tokens/spans)."""
    if train_on_prompt:
        labels = list(input_ids)
    else:
        labels = [IGNORE_INDEX] * len(input_ids)
        k = 0
        for t, (start, end) in enumerate(offsets):
            while k < len(spans) and spans[k][1] <= start and not (start == end == spans[k][1] == spans[k][0]):
                k += 1
            if k == len(spans):
                break
            s, e = spans[k]
            if (start < e and end > s) or (start == end and s <= start < e):
                labels[t] = input_ids[t]
    if labels:
        labels[0] = IGNORE_INDEX
    return labels


# Private-use characters that wrap control-token strings found inside message contents (never in real text).
_MARK_START, _MARK_END = "\ue000", "\ue001"


def _control_token_re(tokenizer) -> re.Pattern:
    key = (id(tokenizer), len(tokenizer))
    if key not in _CONTROL_RE_CACHE:
        tokens = sorted(tokenizer.added_tokens_encoder, key=len, reverse=True)  # longest first
        _CONTROL_RE_CACHE[key] = re.compile("|".join(map(re.escape, tokens)) or "(?!)")
    return _CONTROL_RE_CACHE[key]


_CONTROL_RE_CACHE: dict = {}


def encode_conversation(tokenizer, template: str, messages: list[dict], *, train_on_prompt: bool = False):
    """Returns ``(input_ids, labels)`` for one conversation rendered with a Jinja chat template.

    The rendered text is tokenized in one call, as the official code does: a BOS the template writes first becomes
    the BOS id and the rest is tokenized as the start of a text, so an alpaca row's ids equal
    ``tokenizer(prompt + output)["input_ids"] + [eos]`` (SentencePiece adds its prefix space to the first word:
    Llama-2 ``[1, 13866]`` "<s> ▁Below", not ``[1, 21140, 340]`` "<s> Bel ow") and a llama3 / ChatML row's ids equal
    ``apply_chat_template(tokenize=True)``. A message that *contains* a control-token string such as ``</s>`` or
    ``<|eot_id|>`` (it happens: code and chat logs quote them) has it encoded as plain text, or the model would learn
    to emit EOS mid-reply.
    """
    from .templates import render_with_target_spans

    control = _control_token_re(tokenizer)
    marked = any(control.search(m["content"]) for m in messages)
    if marked:
        messages = [m | {"content": control.sub(lambda x: _MARK_START + x.group(0) + _MARK_END,
                                                m["content"].replace(_MARK_START, "").replace(_MARK_END, ""))}
                    for m in messages]
    text, spans = render_with_target_spans(tokenizer, template, messages)
    bos = tokenizer.bos_token
    head = len(bos) if bos and tokenizer.bos_token_id is not None and text.startswith(bos) else 0
    body = text[head:]
    if marked:
        ids, offsets = _encode_marked(tokenizer, body)
    else:
        # The template writes the special markers itself, so no special tokens are added (as apply_chat_template).
        enc = tokenizer(body, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
    if head:
        ids = [tokenizer.bos_token_id, *ids]
        offsets = [(0, head), *((a + head, b + head) for a, b in offsets)]
    return ids, labels_from_spans(ids, offsets, spans, train_on_prompt)


def _encode_marked(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Tokenize text in which user-supplied control tokens are wrapped in markers: the wrapped ones as plain text,
    the rest (the template's own control tokens included) normally. Offsets refer to ``text``."""
    pattern = re.compile(f"{_MARK_START}(.*?){_MARK_END}", re.S)
    ids, offsets, pos = [], [], 0
    pieces = []
    for m in pattern.finditer(text):
        pieces.append((pos, text[pos:m.start()], False))
        pieces.append((m.start(1), m.group(1), True))
        pos = m.end()
    pieces.append((pos, text[pos:], False))
    for k, (start, piece, as_text) in enumerate(pieces):
        if not piece:
            continue
        # Encode after a newline (except at the very start) so SentencePiece adds no prefix space mid-text; drop it.
        prefix = "\n" if k > 0 else ""
        enc = tokenizer(prefix + piece, add_special_tokens=False, return_offsets_mapping=True,
                        split_special_tokens=as_text, verbose=False)
        for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]):
            if b <= len(prefix):
                continue  # the helper newline
            ids.append(i)
            offsets.append((max(a - len(prefix), 0) + start, b - len(prefix) + start))
    return ids, offsets


def encode_text(tokenizer, text: str) -> tuple[list[int], list[int]]:
    """BOS + text + EOS, every token a target except the first. Special-token strings inside the text are
    tokenized as plain text (a web page that contains ``</s>`` must not end the document)."""
    # verbose=False: documents longer than model_max_length are expected here (they are chunked below).
    ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True, verbose=False)["input_ids"]
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids
    ids = ids + [tokenizer.eos_token_id]
    return ids, [IGNORE_INDEX] + ids[1:]


def _token_ids_as_text(tokenizer, texts: list[str]) -> list[list[int]]:
    """``tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]`` for each text, in one
    call of the Rust backend (no offsets, no per-row Python call; it uses the cores the process has). Falls back to
    the per-row call when the backend is not a plain one (truncation or padding set on it)."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None or not hasattr(backend, "encode_batch_fast") or backend.truncation or backend.padding:
        return [tokenizer(t, add_special_tokens=False, split_special_tokens=True, verbose=False)["input_ids"]
                for t in texts]
    before = backend.encode_special_tokens
    backend.encode_special_tokens = True  # what split_special_tokens=True sets
    try:
        return [e.ids for e in backend.encode_batch_fast(list(texts), add_special_tokens=False)]
    finally:
        backend.encode_special_tokens = before


def encode_text_batch(tokenizer, texts: list[str], *, max_seq_len: int, truncation: str):
    """Text documents -> a ``pyarrow.Table`` (input_ids, labels: list<int32>; length, status) built with numpy.

    Row for row the same as ``encode_text`` + chunking: each document is BOS + text + EOS, split into
    ``max_seq_len`` chunks (each its own document, labels -100 at its first token; a lone trailing token is dropped;
    ``length`` is the document's length on its first chunk, 0 on the others), or one empty DROPPED_TOO_LONG row when
    ``truncation == "drop"`` and it is too long.
    """
    import pyarrow as pa

    if tokenizer.eos_token_id is None:
        raise ValueError("text documents end with EOS, and this tokenizer has no EOS token")
    head = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    tail = [tokenizer.eos_token_id]
    docs = _token_ids_as_text(tokenizer, texts)
    n_docs = np.fromiter(map(len, docs), dtype=np.int64, count=len(docs)) + len(head) + 1
    flat = np.fromiter(chain.from_iterable(chain(head, d, tail) for d in docs), dtype=np.int32, count=int(n_docs.sum()))
    doc_start = np.concatenate([[0], np.cumsum(n_docs)[:-1]])
    # Rows: (first token in flat, token count, length, status); a dropped document is one empty row.
    starts, counts, lengths, status = [], [], [], []
    for s0, n in zip(doc_start.tolist(), n_docs.tolist()):
        if n > max_seq_len and truncation == "drop":
            starts.append(s0), counts.append(0), lengths.append(n), status.append(DROPPED_TOO_LONG)
            continue
        st = KEPT if n <= max_seq_len else TRUNCATED
        for c in range(0, n, max_seq_len):
            size = min(max_seq_len, n - c)
            if size < 2:
                continue  # a lone trailing token has nothing to predict
            starts.append(s0 + c), counts.append(size), lengths.append(n if c == 0 else 0), status.append(st)
    starts_a, counts_a = np.asarray(starts, dtype=np.int64), np.asarray(counts, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts_a)]).astype(np.int32)
    take = np.arange(int(offsets[-1]), dtype=np.int64) + np.repeat(starts_a - offsets[:-1], counts_a)
    ids = flat[take]
    labels = ids.copy()
    labels[offsets[:-1][counts_a > 0]] = IGNORE_INDEX
    pa_offsets = pa.array(offsets, type=pa.int32())
    return pa.table({
        "input_ids": pa.ListArray.from_arrays(pa_offsets, pa.array(ids, type=pa.int32())),
        "labels": pa.ListArray.from_arrays(pa_offsets, pa.array(labels, type=pa.int32())),
        "length": pa.array(lengths, type=pa.int64()),
        "status": pa.array(status, type=pa.int64()),
    })


def encode_batch(batch: dict, *, tokenizer, template: str | None, is_text: bool, train_on_prompt: bool,
                 max_seq_len: int, truncation: str) -> dict:
    """``datasets.map(batched=True)`` function: rows -> input_ids, labels, length, status (a dict of lists for
    conversations, a ``pyarrow.Table`` for text, see ``encode_text_batch``; ``ENCODED_FEATURES`` types both).

    Conversations longer than ``max_seq_len`` are truncated (keeping the start) or dropped; a truncated row that
    lost all its targets is dropped. Text documents are split into ``max_seq_len`` chunks instead (continued
    pre-training must not throw text away); every chunk is its own document.
    """
    if is_text:
        return encode_text_batch(tokenizer, batch["text"], max_seq_len=max_seq_len, truncation=truncation)
    out = {"input_ids": [], "labels": [], "length": [], "status": []}
    wheres = batch.get("where") or [None] * len(batch["messages"])
    for messages, where in zip(batch["messages"], wheres):
        try:
            ids, labels = encode_conversation(tokenizer, template, messages, train_on_prompt=train_on_prompt)
        except Exception as e:  # a user template may raise (raise_exception) or be inconsistent for one row
            from .formats import DataError

            raise DataError(f"{where or 'a row'}: the chat template failed on this conversation: {e}") from e
        n, status = len(ids), KEPT
        if n > max_seq_len:
            if truncation == "drop":
                status = DROPPED_TOO_LONG
            else:
                ids, labels = ids[:max_seq_len], labels[:max_seq_len]
                status = TRUNCATED if any(x != IGNORE_INDEX for x in labels) else DROPPED_NO_TARGET
        elif not any(x != IGNORE_INDEX for x in labels):
            status = DROPPED_NO_TARGET
        if status in (DROPPED_TOO_LONG, DROPPED_NO_TARGET):
            ids, labels = [], []
        out["input_ids"].append(ids), out["labels"].append(labels), out["length"].append(n)
        out["status"].append(status)
    return out
