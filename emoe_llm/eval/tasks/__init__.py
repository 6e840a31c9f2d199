"""lm-evaluation-harness tasks shipped with emoe-llm, over data files in the repo's ``data/``.

The YAMLs in this directory are ordinary lm-eval task configs; their ``custom_dataset`` loaders (below) read the
shipped files by absolute path, so the tasks work from any working directory. ``emoe-llm eval`` adds this directory
to lm-eval's ``TaskManager(include_path=...)``; ``emoe-llm eval --list-tasks`` prints :data:`SHIPPED`.

Runtime options reach a loader as lm-eval task metadata (``TaskManager(metadata=...)``): ``mmlu_dir`` (another
directory of Hendrycks CSVs), ``mmlu_split`` and, for the NLL tasks, ``tokenizer`` (a tokenizer dir, to count response tokens) and ``nll_template`` (the
prompt format, a recipe's data.template).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from emoe_llm.tiny import DATA_DIR

TASKS_DIR = Path(__file__).resolve().parent
MMLU_DIR = DATA_DIR / "eval" / "mmlu"
GSM8K_TEST = DATA_DIR / "eval" / "gsm8k" / "test.jsonl"
ALPACA_DEMO = DATA_DIR / "instruct" / "alpaca_en_demo.json"
SEED_TASKS = DATA_DIR / "instruct" / "seed_tasks.jsonl"
# Recipes that train on alpaca_en_demo.json read its first 900 rows (``max_rows: 900``); rows 900..998 are held out.
ALPACA_HELDOUT_START = 900

# One line per shipped task (groups first), shown by `emoe-llm eval --list-tasks`.
SHIPPED = {
    "emoe_mmlu": "MMLU (Hendrycks CSVs in data/eval/mmlu): 57 subjects emoe_mmlu_<subject>, val split, 5-shot from "
                 "dev, answer-letter log-likelihood; acc, group = mean over questions",
    "emoe_gsm8k": "GSM8K test (1319 problems, data/eval/gsm8k), 5-shot from other test rows, greedy generation; "
                  "exact_match on the number after '####' (strict-match) or the last number (flexible-extract)",
    "emoe_nll_alpaca_heldout": "response NLL of alpaca_en_demo rows 900..998, which training (max_rows: 900) never "
                               "sees, under the checkpoint's training template; nll_per_token (nats per target "
                               "token over all rows, lower is better) and nll_per_row",
    "emoe_nll_selfinstruct": "response NLL of the 175 human-written self-instruct seed tasks (another distribution); "
                             "nll_per_token (nats per target token over all rows, lower is better) and nll_per_row",
    "emoe_arc_easy": "ARC-Easy validation (570), lm-eval's arc_easy prompt; acc, acc_norm",
    "emoe_arc_challenge": "ARC-Challenge validation (299), lm-eval's arc_challenge prompt; acc, acc_norm",
    "emoe_piqa": "PIQA validation (1838), lm-eval's piqa prompt; acc, acc_norm",
    "emoe_sciq": "SciQ validation (1000), lm-eval's sciq prompt; acc, acc_norm",
    "emoe_copa": "COPA validation (100), lm-eval's copa prompt; acc, acc_norm",
    "emoe_openbookqa": "OpenBookQA validation (500), lm-eval's openbookqa prompt; acc, acc_norm",
    "emoe_hellaswag": "HellaSwag validation, first 2831 of 10042 rows, lm-eval's hellaswag prompt; acc, acc_norm",
    "emoe_winogrande": "WinoGrande (xl) validation (1267), lm-eval's partial-scoring winogrande prompt; acc",
}

MMLU_CHOICES = ("A", "B", "C", "D")


class TaskDataError(FileNotFoundError):
    """A shipped task's data file is missing (FileNotFoundError) or malformed: the message names the file."""


def _read_mmlu_csv(path: Path) -> list[dict]:
    """Rows ``question, A, B, C, D, answer`` (no header) -> {question, choices, answer index}; errors name file:line."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (each MMLU subject needs dev/<subject>_dev.csv for the shots and "
                                "<split>/<subject>_<split>.csv)")
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
    rows = []
    reader = csv.reader(io.StringIO(text, newline=""))
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise ValueError(f"{path}:{reader.line_num}: malformed CSV: {e}") from None
        if not row:
            continue
        if len(row) != 6:
            raise ValueError(f"{path}:{reader.line_num}: expected 6 columns (question, A, B, C, D, answer), "
                             f"got {len(row)}")
        answer = row[5].strip().upper()
        if answer not in MMLU_CHOICES:
            raise ValueError(f"{path}:{reader.line_num}: answer must be one of A/B/C/D, got {row[5]!r}")
        rows.append({"question": row[0], "choices": list(row[1:5]), "answer": MMLU_CHOICES.index(answer)})
    if not rows:  # an empty split would score nan and write NaN, which is not JSON
        raise ValueError(f"{path}: no questions (empty file)")
    return rows


def load_mmlu(subject: str, mmlu_dir: str | None = None, mmlu_split: str = "val", **_):
    """DatasetDict of one subject: ``dev`` (the shots) and ``eval``, the scored split (``val`` by default; ``test``
    with the full MMLU data: ``emoe-llm eval --mmlu-dir DIR --mmlu-split test``)."""
    import datasets

    root = Path(mmlu_dir) if mmlu_dir else MMLU_DIR
    if mmlu_split not in ("val", "test", "dev"):
        raise ValueError(f"MMLU split must be val, test or dev, got {mmlu_split!r}")
    splits = {"dev": _read_mmlu_csv(root / "dev" / f"{subject}_dev.csv"),
              "eval": _read_mmlu_csv(root / mmlu_split / f"{subject}_{mmlu_split}.csv")}
    return datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()})


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not valid JSON: {e.msg}") from None
    return rows


def load_gsm8k(**_):
    import datasets

    rows = [{"question": r["question"], "answer": r["answer"]} for r in _read_jsonl(GSM8K_TEST)]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def load_validation_jsonl(file: str, **_):
    """A multiple-choice set shipped as ``data/<file>`` (one JSON row a line, the upstream schema), split validation."""
    import datasets

    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(_read_jsonl(DATA_DIR / file))})


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    """The official Alpaca prompt (no BOS: the harness adds the tokenizer's own), up to and including
    "### Response:"; the response follows with no separator, as in the official training target."""
    from emoe_llm.data.templates import ALPACA_PREAMBLE, ALPACA_PREAMBLE_INPUT

    if input_text:
        return (f"{ALPACA_PREAMBLE_INPUT}\n\n### Instruction:\n{instruction}\n\n### Input:\n{input_text}"
                "\n\n### Response:")
    return f"{ALPACA_PREAMBLE}\n\n### Instruction:\n{instruction}\n\n### Response:"


def nll_prompt_and_target(tok, template: str, row: dict) -> tuple[str, str]:
    """(prompt, target) of one {instruction, input, output} row as training renders it under ``template`` (a
    recipe's data.template): the official Alpaca prompt + output + EOS for ``alpaca``; else the row as a user turn
    and an assistant turn through the chat template, split where the trained span starts and ending where it ends
    (EOS included), so the target is exactly the tokens training learnt."""
    if template == "alpaca":
        return alpaca_prompt(row["instruction"], row.get("input", "")), row["output"] + tok.eos_token
    from emoe_llm.data.formats import normalize_record
    from emoe_llm.data.templates import render_with_target_spans, resolve_template

    _, source = resolve_template(template, tok)
    messages = normalize_record(dict(row), "alpaca", "nll row")["messages"]  # the messages training renders
    text, spans = render_with_target_spans(tok, source, messages)
    start, end = spans[-1]
    return text[:start], text[start:end]


def _nll_dataset(rows: list[dict], tokenizer: str | None, task: str, template: str | None = None):
    """Rows {instruction, input, output} -> {prompt, target, n_target_tokens} under ``template`` (task metadata
    ``nll_template``; default alpaca). The token count is the harness's own split: len(tok(prompt + target)) -
    len(tok(prompt)), so nll_per_token divides by what was scored."""
    import datasets

    if not tokenizer:
        raise ValueError(f"task {task}: needs the model's tokenizer dir as task metadata 'tokenizer' (emoe-llm eval "
                         "passes it; with lm_eval directly: TaskManager(metadata={'tokenizer': CKPT}))")
    from emoe_llm.data import load_tokenizer
    from emoe_llm.data.templates import TemplateError

    tok = load_tokenizer(tokenizer)
    out = []
    for r in rows:
        try:
            prompt, target = nll_prompt_and_target(tok, template or "alpaca", r)
        except TemplateError as e:
            raise ValueError(f"task {task}: nll template {template!r}: {e}") from None
        n = len(tok(prompt + target)["input_ids"]) - len(tok(prompt)["input_ids"])
        out.append({"prompt": prompt, "target": target, "n_target_tokens": n})
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(out)})


def load_alpaca_heldout(tokenizer: str | None = None, nll_template: str | None = None, **_):
    if not ALPACA_DEMO.is_file():
        raise FileNotFoundError(f"{ALPACA_DEMO} not found")
    rows = json.loads(ALPACA_DEMO.read_text(encoding="utf-8"))[ALPACA_HELDOUT_START:]
    return _nll_dataset(rows, tokenizer, "emoe_nll_alpaca_heldout", nll_template)


def load_selfinstruct(tokenizer: str | None = None, nll_template: str | None = None, **_):
    """The 175 seed tasks; each one's first instance gives the input and the reference output."""
    rows = [{"instruction": r["instruction"], "input": r["instances"][0]["input"],
             "output": r["instances"][0]["output"]} for r in _read_jsonl(SEED_TASKS)]
    return _nll_dataset(rows, tokenizer, "emoe_nll_selfinstruct", nll_template)


def nll_process_results(doc: dict, results) -> dict:
    """results = [(loglikelihood, is_greedy)] of the target given the prompt; nats, lower is better. nll_per_token
    is a (summed NLL, target tokens) pair that ``token_weighted`` aggregates."""
    ll = results[0][0]
    return {"nll_per_token": (-ll, max(1, doc["n_target_tokens"])), "nll_per_row": -ll}


def token_weighted(pairs) -> float:
    """sum of NLL / sum of target tokens over the documents: nats per scored token."""
    total, tokens = (sum(p[i] for p in pairs) for i in (0, 1))
    return total / tokens
