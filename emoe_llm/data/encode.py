"""Token ids and labels for one conversation or one text document.

Labels are aligned with ``input_ids`` (HF convention: the model shifts them; logits[t] predicts labels[t+1]) and hold
-100 where no loss is taken. Rule: ``labels[0] == -100`` for every document, because nothing inside the document
predicts its first token; packed documents therefore can never be trained to predict their neighbour.
"""

from __future__ import annotations

import re

IGNORE_INDEX = -100

# Row status codes produced by `encode_batch` (kept in the cache so stats can be recomputed without re-tokenizing).
KEPT, TRUNCATED, DROPPED_TOO_LONG, DROPPED_NO_TARGET = 0, 1, 2, 3


def labels_from_spans(input_ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]],
                      train_on_prompt: bool) -> list[int]:
    """A token is a target when its characters overlap a target span (a token that straddles the prompt/response
    boundary, like Llama-2's ``▁Sure`` after ``[/INST]``, is one the model must generate, so it is a target)."""
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

    The whole rendered text is tokenized in one call (so ids equal ``apply_chat_template(tokenize=True)``), except
    when a message *contains* a control-token string such as ``</s>`` or ``<|eot_id|>`` (it happens: code and chat
    logs quote them): such strings are encoded as plain text, or the model would learn to emit EOS mid-reply.
    """
    from .templates import render_with_target_spans

    control = _control_token_re(tokenizer)
    if any(control.search(m["content"]) for m in messages):
        marked = [m | {"content": control.sub(lambda x: _MARK_START + x.group(0) + _MARK_END,
                                              m["content"].replace(_MARK_START, "").replace(_MARK_END, ""))}
                  for m in messages]
        text, spans = render_with_target_spans(tokenizer, template, marked)
        ids, offsets = _encode_marked(tokenizer, text)
    else:
        text, spans = render_with_target_spans(tokenizer, template, messages)
        # The template writes BOS and special markers itself, so no special tokens are added (as apply_chat_template).
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
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


def encode_batch(batch: dict, *, tokenizer, template: str | None, is_text: bool, train_on_prompt: bool,
                 max_seq_len: int, truncation: str) -> dict:
    """``datasets.map(batched=True)`` function: rows -> input_ids, labels, length, status.

    Conversations longer than ``max_seq_len`` are truncated (keeping the start) or dropped; a truncated row that
    lost all its targets is dropped. Text documents are split into ``max_seq_len`` chunks instead (continued
    pre-training must not throw text away); every chunk is its own document.
    """
    out = {"input_ids": [], "labels": [], "length": [], "status": []}
    if is_text:
        for text in batch["text"]:
            ids, labels = encode_text(tokenizer, text)
            n = len(ids)
            if n > max_seq_len and truncation == "drop":
                out["input_ids"].append([]), out["labels"].append([]), out["length"].append(n)
                out["status"].append(DROPPED_TOO_LONG)
                continue
            for start in range(0, n, max_seq_len):
                chunk = ids[start:start + max_seq_len]
                if len(chunk) < 2:
                    continue  # a lone trailing token has nothing to predict
                out["input_ids"].append(chunk)
                out["labels"].append([IGNORE_INDEX] + chunk[1:])
                out["length"].append(n if start == 0 else 0)  # the document's length is counted once
                out["status"].append(KEPT if n <= max_seq_len else TRUNCATED)
        return out
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
