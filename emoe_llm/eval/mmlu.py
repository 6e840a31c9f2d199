"""MMLU from local CSVs (Hendrycks format), k-shot, scored by the log-likelihood of the answer letter.

Layout of ``mmlu_dir`` (the shipped ``data/eval/mmlu``, or the original ``data/`` of hendrycks/test):

    dev/<subject>_dev.csv      few-shot examples (5 per subject)
    val/<subject>_val.csv      validation questions        test/<subject>_test.csv   test questions
    subject_categories.json    optional {subject: {"category": ..., "subcategory": ...}}

Rows are ``question, A, B, C, D, answer`` with no header. The prompt is the original one:

    The following are multiple choice questions (with answers) about abstract algebra.

    <question>
    A. <a>
    B. <b>
    C. <c>
    D. <d>
    Answer: <X>

    ... (k shots) ... <test question> ... Answer:

and the prediction is argmax over log p(" A"), ..., log p(" D") after "Answer:". Shots are dropped from the front
when the prompt would not fit ``max_length`` (as the original evaluation does).
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

CHOICES = ("A", "B", "C", "D")


@dataclass
class Question:
    subject: str
    question: str
    options: tuple[str, str, str, str]
    answer: str


def _read_csv(path: Path, subject: str) -> list[Question]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (each subject needs dev/<subject>_dev.csv for the shots and "
                                f"<split>/<subject>_<split>.csv)")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                         "MMLU CSVs must be UTF-8") from None
    if "\x00" in text:
        line = text[: text.index("\x00")].count("\n") + 1
        raise ValueError(f"{path}:{line}: contains NUL bytes: a binary file, not an MMLU CSV")
    out = []
    reader = csv.reader(io.StringIO(text, newline=""))
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise ValueError(f"{path}:{reader.line_num}: malformed CSV: {e}") from None
        line_no = reader.line_num
        if not row:
            continue
        if len(row) != 6:
            raise ValueError(f"{path}:{line_no}: expected 6 columns (question, A, B, C, D, answer), got {len(row)}")
        answer = row[5].strip().upper()
        if answer not in CHOICES:
            raise ValueError(f"{path}:{line_no}: answer must be one of A/B/C/D, got {row[5]!r}")
        out.append(Question(subject, row[0], tuple(row[1:5]), answer))
    return out


def list_subjects(mmlu_dir: str | Path, split: str) -> list[str]:
    d = Path(mmlu_dir) / split
    if not d.is_dir():
        raise FileNotFoundError(f"MMLU split dir {d} not found (expected {mmlu_dir}/{{dev,val,test}}/*.csv)")
    suffix = f"_{split}.csv"
    subjects = sorted(p.name[: -len(suffix)] for p in d.glob(f"*{suffix}"))
    if not subjects:
        raise FileNotFoundError(f"no *{suffix} files in {d}")
    return subjects


def load_categories(mmlu_dir: str | Path) -> dict:
    p = Path(mmlu_dir) / "subject_categories.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def format_subject(subject: str) -> str:
    return subject.replace("_", " ")


def format_question(q: Question, *, with_answer: bool) -> str:
    text = q.question
    for letter, option in zip(CHOICES, q.options):
        text += f"\n{letter}. {option}"
    text += "\nAnswer:"
    if with_answer:
        text += f" {q.answer}\n\n"
    return text


def build_prompt(shots: list[Question], q: Question) -> str:
    head = f"The following are multiple choice questions (with answers) about {format_subject(q.subject)}.\n\n"
    return head + "".join(format_question(s, with_answer=True) for s in shots) + format_question(q, with_answer=False)


def answer_token_ids(tokenizer) -> list[int]:
    """Token id of " A" .. " D" as they follow "Answer:" (the last token of the encoded "Answer: X")."""
    ids = []
    for letter in CHOICES:
        base = tokenizer("Answer:", add_special_tokens=False)["input_ids"]
        full = tokenizer(f"Answer: {letter}", add_special_tokens=False)["input_ids"]
        if full[: len(base)] != base or len(full) != len(base) + 1:
            raise ValueError(
                f"the tokenizer does not encode ' {letter}' as one token after 'Answer:' ({base} -> {full}); "
                "single-token answers are needed for letter scoring"
            )
        ids.append(full[-1])
    return ids


def read_mmlu(mmlu_dir: str | Path, *, split: str = "val", shots: int = 5, subjects=None, limit: int = 0
              ) -> dict[str, tuple[list[Question], list[Question]]]:
    """{subject: (dev shots, questions)}, every CSV read and checked: cheap, so ``emoe-llm eval`` runs it before
    loading the weights. Raises ValueError/FileNotFoundError naming the file (and line) on bad or empty input."""
    mmlu_dir = Path(mmlu_dir)
    if shots < 0 or limit < 0:
        raise ValueError(f"--shots and --limit must be >= 0, got shots={shots}, limit={limit}")
    all_subjects = list_subjects(mmlu_dir, split)
    if subjects:
        wanted = [s.strip() for s in (subjects.split(",") if isinstance(subjects, str) else subjects) if s.strip()]
        unknown = sorted(set(wanted) - set(all_subjects))
        if unknown:
            raise ValueError(
                f"unknown MMLU subject(s) {unknown} in {mmlu_dir}/{split}; known: {', '.join(all_subjects)}"
            )
        all_subjects = wanted
    out = {}
    for subject in all_subjects:
        dev = _read_csv(mmlu_dir / "dev" / f"{subject}_dev.csv", subject) if shots else []
        path = mmlu_dir / split / f"{subject}_{split}.csv"
        qs = _read_csv(path, subject)
        if not qs:  # an empty split would score nan% and write NaN, which is not JSON
            raise ValueError(f"{path}: no questions (empty file); remove it or pass --subjects without it")
        out[subject] = (dev, qs[:limit] if limit else qs)
    return out


@torch.no_grad()
def evaluate_mmlu(model, tokenizer, mmlu_dir: str | Path = "data/eval/mmlu", *, split: str = "val", shots: int = 5,
                  subjects=None, limit: int = 0, batch_size: int = 8, max_length: int | None = None,
                  device=None, progress: bool = True, questions=None) -> dict:
    """Accuracy per subject, per category and overall (micro average over questions, as in the MMLU paper).

    ``questions``: the result of :func:`read_mmlu` when the caller already read (and checked) the CSVs.
    Returns {"overall": {"acc", "n"}, "categories": {cat: {"acc", "n"}}, "subjects": {subj: {"acc", "n"}},
    "settings": {...}}."""
    mmlu_dir = Path(mmlu_dir)
    if questions is None:
        questions = read_mmlu(mmlu_dir, split=split, shots=shots, subjects=subjects, limit=limit)
    all_subjects = list(questions)
    categories = load_categories(mmlu_dir)
    device = device or model.get_input_embeddings().weight.device  # first device when sharded (device_map)
    if max_length is None:
        max_length = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
    letter_ids = torch.tensor(answer_token_ids(tokenizer), device=device)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None and _adds_bos(tokenizer) else []
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    items = []  # (subject, ids, answer_idx, shots_used, question index)
    for subject, (dev, qs) in questions.items():
        for qi, q in enumerate(qs):
            k = min(shots, len(dev))
            while True:
                ids = bos + tokenizer(build_prompt(dev[:k], q), add_special_tokens=False)["input_ids"]
                if len(ids) <= max_length or k == 0:
                    break
                k -= 1
            ids = ids[-max_length:]
            items.append((subject, ids, CHOICES.index(q.answer), k, qi))

    model.eval()
    correct: dict[str, int] = {}
    count: dict[str, int] = {}
    predictions = {s: [None] * len(qs) for s, (_, qs) in questions.items()}
    logp_right = 0.0
    order = sorted(range(len(items)), key=lambda i: -len(items[i][1]))  # length-sorted batches: less padding
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(items), desc="mmlu", dynamic_ncols=True)
    for start in range(0, len(order), batch_size):
        chunk = [items[i] for i in order[start:start + batch_size]]
        T = max(len(it[1]) for it in chunk)
        input_ids = torch.full((len(chunk), T), pad_id, dtype=torch.long)
        attn = torch.zeros((len(chunk), T), dtype=torch.long)
        for b, it in enumerate(chunk):  # left padding: the last position is the answer slot for every row
            input_ids[b, T - len(it[1]):] = torch.tensor(it[1])
            attn[b, T - len(it[1]):] = 1
        position_ids = (attn.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=input_ids.to(device), attention_mask=attn.to(device),
                    position_ids=position_ids.to(device), use_cache=False, logits_to_keep=1)
        logp = torch.log_softmax(out.logits[:, -1].float(), dim=-1)[:, letter_ids]
        pred = logp.argmax(-1).tolist()
        # log-prob of the right letter among A-D: a continuous score that shows small model differences
        answer = torch.tensor([it[2] for it in chunk], device=logp.device)
        logp_right += torch.log_softmax(logp, dim=-1).gather(1, answer[:, None]).sum().item()
        for it, p in zip(chunk, pred):
            predictions[it[0]][it[4]] = p
            count[it[0]] = count.get(it[0], 0) + 1
            correct[it[0]] = correct.get(it[0], 0) + int(p == it[2])
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()

    by_subject = {s: {"acc": correct.get(s, 0) / count[s], "n": count[s]} for s in all_subjects if count.get(s)}
    by_cat: dict[str, list[int]] = {}
    for s, r in by_subject.items():
        cat = categories.get(s, {}).get("category", "uncategorised")
        c = by_cat.setdefault(cat, [0, 0])
        c[0] += correct.get(s, 0)
        c[1] += r["n"]
    n = sum(count.values())
    return {
        "overall": {"acc": sum(correct.values()) / n if n else math.nan, "n": n,
                    "mean_logprob_answer": logp_right / n if n else math.nan},
        "categories": {c: {"acc": v[0] / v[1], "n": v[1]} for c, v in sorted(by_cat.items())},
        "subjects": by_subject,
        "predictions": predictions,
        "settings": {"mmlu_dir": str(mmlu_dir), "split": split, "shots": shots, "limit": limit,
                     "max_length": max_length, "subjects": all_subjects,
                     "mean_shots_used": sum(it[3] for it in items) / max(1, len(items))},
    }


def _adds_bos(tokenizer) -> bool:
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def format_report(result: dict) -> str:
    lines = []
    for cat, r in result["categories"].items():
        lines.append(f"  {cat:<34} {100 * r['acc']:6.2f}%  (n={r['n']})")
    o = result["overall"]
    lines.append(f"  {'overall':<34} {100 * o['acc']:6.2f}%  (n={o['n']})")
    return "\n".join(lines)
