"""Chat templates (Jinja, the same language as HF `chat_template`) and rendering with trainable character spans.

Every template, built in or not, goes through ``tokenizer.apply_chat_template`` so there is a single code path.
The assistant spans are found by rendering prefixes of the conversation: the text added by
``render(messages[:i+1])`` over ``render(messages[:i], add_generation_prompt=True)`` is assistant turn ``i``
(its content plus the template's end-of-turn marker, e.g. ``<|eot_id|>`` or `` </s>``). That works for any
template whose renders of shorter conversations are prefixes of longer ones; others are rejected with an error.
"""

from __future__ import annotations

from pathlib import Path

# The Stanford Alpaca prompt, character for character as PROMPT_DICT in tatsu-lab/stanford_alpaca train.py (also the
# fixed template of the EMoE code, qiuzh20/EMoE moe_train.py): the "paired with an input" preamble and an
# `### Input:` block when the row has a non-empty input, and the response follows "### Response:" directly (no
# newline; the official target is f"{output}{eos}"). An alpaca-format row keeps its `instruction` / `input` on the
# user message (formats.py), so this template can lay them out; other templates see ``content`` (instruction +
# "\n\n" + input). Multi-turn rows (LLaMA-Factory's `history`) repeat the Instruction/Response blocks.
ALPACA_PREAMBLE = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
ALPACA_PREAMBLE_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                         "context. Write a response that appropriately completes the request.")
ALPACA_SYSTEM = ALPACA_PREAMBLE  # kept for importers

# data.template_variation: true -- (no-input, with-input) preambles of our own, the first the official pair. The
# official EMoE code picks one of 12 prompt variants once per process with an unseeded random.choice; here every row
# gets one by a seeded hash, so the choice is reproducible and the same on every rank.
ALPACA_PREAMBLE_VARIANTS = (
    (ALPACA_PREAMBLE, ALPACA_PREAMBLE_INPUT),
    ("Below is an instruction describing a task. Write a response that completes the request appropriately.",
     "Below is an instruction describing a task, together with an input that gives more context. Write a response "
     "that completes the request appropriately."),
    ("The following is an instruction that describes a task. Write an appropriate response to the request.",
     "The following is an instruction that describes a task, paired with further context in the input. Write an "
     "appropriate response to the request."),
    ("Here is a task instruction. Respond in a way that appropriately completes the request.",
     "Here is a task instruction and an input with additional context. Respond in a way that appropriately "
     "completes the request."),
    ("Read the instruction below, then write a response that appropriately completes the request.",
     "Read the instruction below and the input that provides context, then write a response that appropriately "
     "completes the request."),
)

# data.template_variation: official -- the 12 prompt pairs of the official EMoE code, verbatim
# (``utils.PROMPT_TEMPLATE`` of the MAmmoTH-lineage utils.py that its moe_train.py imports; the first is the Stanford Alpaca prompt). Quirks kept
# on purpose: several no-input variants have no blank line before "### Instruction:", and one with-input variant
# writes "#Instruction:". (prompt_input, prompt_no_input), str.format fields {instruction} and {input}.
OFFICIAL_PROMPT_VARIANTS = (
    (  # 1
        ALPACA_PREAMBLE_INPUT + "\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:",
        ALPACA_PREAMBLE + "\n\n"
        "### Instruction:\n{instruction}\n\n### Response:",
    ),
    (  # 2
        "You are supposed to follow an instruction, and then the input to generate proper response.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:",
        "You are supposed to follow an instruction to generate proper response."
        "### Instruction:\n{instruction}\n\n### Response:",
    ),
    (  # 3
        "Please follow the instruction and input to give a response.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:",
        "Please follow the instruction to give a response."
        "### Instruction:\n{instruction}\n\n### Response:",
    ),
    (  # 4
        "You are an expert, please listen to human instruction and input to generate the response.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:",
        "You are an expert, please listen to human instruction to generate the response.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:",
    ),
    (  # 5
        "Let's follow the instruction to respond to an input.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:",
        "Let's follow the instruction to generate a response.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:",
    ),
    (  # 6
        "The instruction is a description of the task. You need to follow that and respond to the paired input.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:",
        "The instruction is a description of the task. You need to follow that and respond.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:",
    ),
    (  # 7
        ALPACA_PREAMBLE_INPUT + "\n\n"
        "Instruction:\n{instruction}\n\nInput:\n{input}\n\nResponse:",
        ALPACA_PREAMBLE + "\n\n"
        "Instruction:\n{instruction}\n\nResponse:",
    ),
    (  # 8
        "You are supposed to follow an instruction, and then the input to generate proper response.\n\n"
        "#Instruction:\n{instruction}\n\nInput:\n{input}\n\nResponse:",
        "You are supposed to follow an instruction to generate proper response."
        "Instruction:\n{instruction}\n\nResponse:",
    ),
    (  # 9
        "Please follow the instruction and input to give a response.\n\n"
        "Instruction:\n{instruction}\n\nInput:\n{input}\n\nResponse:",
        "Please follow the instruction to give a response."
        "Instruction:\n{instruction}\n\nResponse:",
    ),
    (  # 10
        "You are an expert, please listen to human instruction and input to generate the response.\n\n"
        "Instruction:\n{instruction}\n\nInput:\n{input}\n\nResponse:",
        "You are an expert, please listen to human instruction to generate the response.\n\n"
        "Instruction:\n{instruction}\n\nResponse:",
    ),
    (  # 11
        "Let's follow the instruction to respond to an input.\n\n"
        "Instruction:\n{instruction}\n\nInput:\n{input}\n\nResponse:",
        "Let's follow the instruction to generate a response.\n\n"
        "Instruction:\n{instruction}\n\nResponse:",
    ),
    (  # 12
        "The instruction is a description of the task. You need to follow that and respond to the paired input.\n\n"
        "Instruction:\n{instruction}\n\nInput:\n{input}\n\nResponse:",
        "The instruction is a description of the task. You need to follow that and respond.\n\n"
        "Instruction:\n{instruction}\n\nResponse:",
    ),
)

ALPACA_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system_message = messages[0]['content'] %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set loop_messages = messages %}"
    "{% if loop_messages and loop_messages[0]['input'] is defined and loop_messages[0]['input'] %}"
    "{% set system_message = '" + ALPACA_PREAMBLE_INPUT + "' %}"
    "{% else %}{% set system_message = '" + ALPACA_PREAMBLE + "' %}{% endif %}{% endif %}"
    "{% if loop_messages and loop_messages[0]['prompt'] is defined and loop_messages[0]['prompt'] %}"
    "{% set system_message = '' %}{% endif %}"
    "{{ bos_token or '' }}{{ system_message }}"
    "{% for message in loop_messages %}"
    "{% if message['role'] == 'user' and message['prompt'] is defined and message['prompt'] %}{{ message['prompt'] }}"
    "{% elif message['role'] == 'user' %}"
    "{% if message['instruction'] is defined and message['instruction'] is string %}"
    "{{ '\\n\\n### Instruction:\\n' + message['instruction'] }}"
    "{% if message['input'] is defined and message['input'] %}{{ '\\n\\n### Input:\\n' + message['input'] }}{% endif %}"
    "{% else %}{{ '\\n\\n### Instruction:\\n' + message['content'] }}{% endif %}"
    "{{ '\\n\\n### Response:' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)

# The form emoe_llm used before the official one: always the no-input preamble, the input appended to the instruction
# (content), and a newline after "### Response:". Kept for runs that were trained with it.
ALPACA_MERGED_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system_message = messages[0]['content'] %}"
    "{% set loop_messages = messages[1:] %}{% else %}"
    "{% set system_message = '" + ALPACA_PREAMBLE + "' %}{% set loop_messages = messages %}{% endif %}"
    "{{ bos_token or '' }}{{ system_message }}"
    "{% for message in loop_messages %}"
    "{% if message['role'] == 'user' %}{{ '\\n\\n### Instruction:\\n' + message['content'] + '\\n\\n### Response:\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)

# Meta's Llama-2-chat format (as in the widely used HF template): <s>[INST] <<SYS>>..<</SYS>> user [/INST] reply </s>
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)

# The Llama-3-Instruct template (identical to the one in data/tokenizers/llama3/tokenizer_config.json).
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

BUILTIN = {"alpaca": ALPACA_TEMPLATE, "alpaca_merged": ALPACA_MERGED_TEMPLATE, "llama2": LLAMA2_TEMPLATE, "llama3": LLAMA3_TEMPLATE}
# Tokens a built-in template writes literally; the tokenizer must know them as single tokens.
_REQUIRED_TOKENS = {"llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")}


class TemplateError(ValueError):
    pass


def resolve_template(name: str, tokenizer) -> tuple[str, str]:
    """Return ``(template_name, jinja_source)``.

    ``auto`` = the tokenizer's own ``chat_template`` if it has one, else ``alpaca``; a path names a Jinja file.
    """
    if name == "auto":
        own = getattr(tokenizer, "chat_template", None)
        if isinstance(own, dict):  # several named templates: use the default one
            own = own.get("default")
        if isinstance(own, str) and own.strip():
            return "tokenizer", own
        name = "alpaca"
    if name in BUILTIN:
        vocab = tokenizer.get_vocab()
        missing = [t for t in _REQUIRED_TOKENS.get(name, ()) if t not in vocab]
        if missing:
            raise TemplateError(f"template {name!r} needs the special tokens {missing}, which this tokenizer lacks")
        if tokenizer.eos_token is None:
            raise TemplateError(f"template {name!r} needs an EOS token; the tokenizer has none")
        return name, BUILTIN[name]
    p = Path(name)
    if not p.is_file():
        raise TemplateError(f"template {name!r} is neither one of auto/{'/'.join(BUILTIN)} nor an existing file")
    source = p.read_text(encoding="utf-8")
    if "messages" not in source:
        raise TemplateError(f"{name}: does not look like a Jinja chat template (it never reads `messages`)")
    return str(p), source


def _render(tokenizer, template: str, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def render_with_target_spans(tokenizer, template: str, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation and return ``(text, spans)``; ``spans`` are ``[start, end)`` character ranges of the
    assistant turns (the tokens to train on). The text always ends with the tokenizer's EOS, appended if the
    template does not end with it, and the appended EOS belongs to the last span, so the model learns to stop.
    """
    full = _render(tokenizer, template, messages, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = _render(tokenizer, template, messages[:i], add_generation_prompt=True)
        upto = full if i == len(messages) - 1 else _render(tokenizer, template, messages[: i + 1], False)
        if not (full.startswith(upto) and upto.startswith(prompt)) or len(upto) <= len(prompt):
            raise TemplateError(
                "the chat template is not prefix-consistent: rendering the first "
                f"{i} messages (with generation prompt) is not a prefix of rendering the first {i + 1}, so the "
                "assistant tokens cannot be located; use a built-in template (alpaca/alpaca_merged/llama2/llama3) or fix the template")
        spans.append((len(prompt), len(upto)))
    eos = tokenizer.eos_token
    if eos:
        # ChatML-style templates end a turn with EOS + "\n" (SmolLM2, Qwen-style with <|im_end|> as EOS): the turn
        # is learnt up to and including EOS; the newline after it belongs to the layout, not to the reply, and a
        # text that already ends with EOS + whitespace needs no second EOS.
        spans = [(s, s + len(full[s:e].rstrip())) if full[s:e].rstrip().endswith(eos) else (s, e) for s, e in spans]
    if eos and not full.rstrip().endswith(eos):
        full += eos
        if spans and spans[-1][1] == len(full) - len(eos):
            spans[-1] = (spans[-1][0], len(full))
        else:
            spans.append((len(full) - len(eos), len(full)))
    return full, spans
