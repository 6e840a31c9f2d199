"""Every `emoe-llm ...` command quoted in README.md, docs/ and configs/ parses with the real argument parsers (and,
where it names a shipped recipe or study file, its key=value overrides load): a renamed or removed flag fails here,
not on a user's cluster. docs/errors.md is left out: its commands are wrong on purpose."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from emoe_llm.cli import SUBCOMMANDS, parse_command

REPO = Path(__file__).resolve().parents[1]
SOURCES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "configs").glob("*.yaml"))]
SKIP = {REPO / "docs" / "errors.md"}


def _placeholders(text: str) -> str:
    """Shell and documentation placeholders -> plain words the parsers accept."""
    text = re.sub(r"\$\([^)]*\)", "/models/x", text)             # $(scripts/get_smollm2.sh)
    text = re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?", "X", text)  # $SRC, ${RECIPE}
    text = re.sub(r"<[^>]*>", "X", text)                          # <full MMLU>
    # [--flag a|b] optional parts of a synopsis: kept, with their first alternative
    text = re.sub(r"\[([^\[\]]*)\]", lambda m: m.group(1).split("|")[0], text)
    text = re.sub(r"(\S+)\|\S+", r"\1", text)                     # kmeans|random -> kmeans
    text = re.sub(r"(?<=\s)[A-WYZ](?=\s|$)", "1", text)            # --seed S, --top-k K, --limit N: numbers
    return text.replace("...", " ")


def documented_commands() -> list[tuple[str, str]]:
    """(where, command text after `emoe-llm `) for every command that has arguments or stands alone on its line."""
    found = []
    for path in SOURCES:
        if path in SKIP:
            continue
        lines = path.read_text().splitlines()
        for n, line in enumerate(lines, 1):
            for m in re.finditer(r"(`?)emoe-llm ([a-z]+)\b(.*)", line):
                inline, name, tail = m.group(1), m.group(2), m.group(3)
                if name not in SUBCOMMANDS or tail.startswith(":"):  # prose ("emoe-llm is"), an error message
                    continue
                if inline:  # `emoe-llm eval --list-tasks` in running text: up to the closing backtick
                    tail = tail.split("`", 1)[0]
                    if not tail.strip():
                        continue  # a name (`emoe-llm verify`), not a command
                else:
                    tail = tail.split("`", 1)[0]
                    j = n
                    while tail.rstrip().endswith("\\") and j < len(lines):  # continued lines
                        tail = tail.rstrip()[:-1] + " " + lines[j].lstrip("# ").strip()
                        j += 1
                tail = re.split(r"\s#|\s&&\s|\s\|\s|;", tail)[0]
                found.append((f"{path.relative_to(REPO)}:{n}", f"{name}{_placeholders(tail)}"))
    return found


COMMANDS = documented_commands()


def test_the_docs_quote_commands_of_every_kind():
    names = {cmd.split()[0] for _, cmd in COMMANDS}
    assert {"convert", "verify", "train", "eval", "probe", "plan", "study", "report", "demo"} <= names
    assert len(COMMANDS) > 60


@pytest.mark.parametrize("where, command", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_documented_command_parses(where, command, capsys):
    import shlex

    argv = shlex.split(command)
    try:
        module, args = parse_command(argv[0], argv[1:])
        if hasattr(module, "check_args"):
            module.check_args(args)
    except SystemExit as e:
        pytest.fail(f"{where}: `emoe-llm {command}` does not parse ({e.code}): {capsys.readouterr().err.strip()}")
    overrides = [a for a in argv[1:] if "=" in a and not a.startswith("-")]
    if argv[0] == "train":
        from emoe_llm.train.config import load_config

        config = argv[argv.index("--config") + 1]
        if (REPO / config).is_file():
            load_config(REPO / config, overrides)  # a stale override key raises ConfigError here
    if argv[0] == "study" and (REPO / argv[1]).is_file():
        import os

        from emoe_llm.study.spec import load_study

        cwd = os.getcwd()
        os.chdir(REPO)  # study files name their base recipe relative to the repo root
        try:
            load_study(argv[1], overrides)
        finally:
            os.chdir(cwd)
