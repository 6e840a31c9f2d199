"""Typed config for the data pipeline: the `data:` section of a recipe YAML."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

FORMATS = ("auto", "alpaca", "sharegpt", "messages", "text")
BUILTIN_TEMPLATES = ("auto", "alpaca", "alpaca_merged", "llama2", "llama3")
EMPTY_RESPONSE = ("error", "skip", "eos")
TRUNCATION = ("truncate", "drop")


@dataclass
class DataSource:
    """One input file or `load_from_disk` directory, or a dataset repo (`hub:`); `weight` only matters when mixing
    several."""

    path: str = ""
    """File (.json/.jsonl/.csv/.parquet/.arrow/.txt; JSON, CSV and text also .gz/.bz2/.xz/.zst), a
    `datasets.save_to_disk` dir, or a dir of data files of one kind (read in sorted order); relative paths resolve
    against the cwd. With `hub:` the run sets it to the repo's snapshot dir."""
    hub: str | None = None
    """a dataset repo read with datasets.load_dataset: a Hub id (org/name, fetched into the HF cache; HF_HUB_OFFLINE=1
    reads only the cache) or a local dataset repo dir"""
    split: str = "train"
    """with `hub:`: the split to read"""
    name: str | None = None
    """with `hub:`: the subset (load_dataset's `name`, the repo's README config)"""
    revision: str | None = None
    """with `hub:` as a Hub id: the branch, tag or commit (default main)"""
    hub_commit: str | None = None
    """set by the run, not in a recipe: the commit the Hub id resolved to"""
    format: str = "auto"
    """auto | alpaca | sharegpt | messages | text (auto: from the file suffix and the first row's keys)."""
    weight: float | None = None
    """Share of the training mix relative to the other sources' weights (the mix keeps the total row count; a source
    is subsampled or repeated to reach its share). None on every source = plain concatenation at natural sizes.
    Set it on every source or on none."""
    max_rows: int | None = None
    """Read at most this many rows (the first ones; useful for smoke tests)."""

    def __post_init__(self):
        if self.hub is not None:
            if not isinstance(self.hub, str) or not self.hub.strip():
                raise ValueError(f"data source hub must be a dataset repo id or directory, got {self.hub!r}")
            if self.path and self.hub_commit is None and self.path != self.hub:
                raise ValueError(f"data source: set `path` (a file or directory) or `hub` (a dataset repo), not both "
                                 f"(path {self.path!r}, hub {self.hub!r})")
            if not self.path:
                self.path = self.hub  # until resolve_hub_source: what errors and logs name
        elif self.revision is not None or self.name is not None or self.split != "train":
            raise ValueError(f"data source {self.path!r}: split/name/revision go with `hub:` (a dataset repo)")
        if not isinstance(self.path, str) or not self.path.strip():  # Path("") is the cwd: it always "exists"
            raise ValueError(f"data source path must be a file or directory, got {self.path!r}")
        if self.format not in FORMATS:
            raise ValueError(f"data source {self.path!r}: format must be one of {FORMATS}, got {self.format!r}")
        if self.weight is not None and not (0 < self.weight < math.inf):
            raise ValueError(f"data source {self.path!r}: weight must be > 0, got {self.weight!r}")
        if self.max_rows is not None and self.max_rows <= 0:
            raise ValueError(f"data source {self.path!r}: max_rows must be a positive integer, got {self.max_rows!r}")


    def load_args(self) -> dict | None:
        """load_dataset's keywords for a `hub:` source (None: a file or directory read by emoe_llm's own reader)."""
        return None if self.hub is None else {"split": self.split, "name": self.name}


def resolve_hub_source(src: DataSource) -> None:
    """A `hub:` Hub id -> its dataset snapshot dir in the HF cache (fetched unless HF_HUB_OFFLINE=1), in `path`."""
    from .. import hub

    if src.hub is None or src.hub_commit is not None:
        return
    try:
        resolved = hub.resolve(src.hub, revision=src.revision, repo_type="dataset")
    except hub.HubError as e:
        raise ValueError(f"data source hub: {e}") from None
    src.path, src.hub_commit = str(resolved.path), resolved.commit


@dataclass
class DataConfig:
    sources: list[DataSource]
    template: str = "auto"
    """auto (the tokenizer's chat template if it has one, else alpaca) | alpaca (the official Stanford Alpaca prompt) |
    alpaca_merged (emoe_llm's earlier form: input appended to the instruction) | llama2 | llama3 | a .jinja path."""
    max_seq_len: int = 512
    packing: bool = False
    """Pack documents into rows of exactly `max_seq_len` tokens (position_ids restart at 0 per document)."""
    train_on_prompt: bool = False
    """True = loss on every token (always the case for `text` sources)."""
    truncation: str = "truncate"
    """truncate | drop: what to do with a conversation longer than `max_seq_len` (text documents are split instead)."""
    eval_fraction: float = 0.0
    """Fraction of every source held out for evaluation (deterministic for a seed); ignored when eval_sources is set."""
    eval_sources: list[DataSource] = field(default_factory=list)
    empty_response: str = "error"
    """error | skip | eos: a row whose response is empty stops the run (error), is left out (skip), or is trained as
    an EOS-only target (eos, what the official Stanford Alpaca / EMoE code does). Counted in data_stats.json."""
    template_variation: bool | str = False
    """alpaca template only, chosen per row by a hash of (seed, row), the same on every rank: ``true`` = one of our 5
    preamble variants (templates.ALPACA_PREAMBLE_VARIANTS, the first the official one); ``official`` = one of the 12
    prompt variants of the official EMoE code (templates.OFFICIAL_PROMPT_VARIANTS); ``false`` = the fixed prompt."""
    skip_bad_rows: bool = False
    """Skip (and count) malformed rows instead of stopping at the first one."""
    cache_dir: str | None = None
    """Where tokenized datasets are cached (default: $EMOE_LLM_CACHE or ~/.cache/emoe_llm/data)."""
    seed: int = 0
    system_prompt: str | None = None
    """Added as the system turn to conversations that have none (alpaca rows included)."""
    num_proc: int | None = None
    """Worker processes for tokenization (None = in-process)."""

    def __post_init__(self):
        if not self.sources:
            raise ValueError("data.sources: at least one source is required")
        if self.max_seq_len < 2:
            raise ValueError(f"data.max_seq_len must be >= 2, got {self.max_seq_len}")
        if self.truncation not in TRUNCATION:
            raise ValueError(f"data.truncation must be one of {TRUNCATION}, got {self.truncation!r}")
        weighted = [s.weight is not None for s in self.sources]
        if any(weighted) and not all(weighted):
            raise ValueError("data.sources: set `weight` on every source or on none (none = concatenate at natural "
                             f"sizes); missing on {[s.path for s in self.sources if s.weight is None]}")
        if not (0.0 <= self.eval_fraction < 1.0):
            raise ValueError(f"data.eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.empty_response not in EMPTY_RESPONSE:
            raise ValueError(f"data.empty_response must be one of {EMPTY_RESPONSE}, got {self.empty_response!r}")
        if self.template_variation not in (False, True, "official"):
            raise ValueError(f"data.template_variation must be true, false or official, "
                             f"got {self.template_variation!r}")
        if self.template_variation and self.template != "alpaca":
            raise ValueError(f"data.template_variation varies the Alpaca preamble: it needs template 'alpaca', "
                             f"got {self.template!r}")
        if not isinstance(self.template, str) or not self.template:
            raise ValueError("data.template must be a non-empty string")


_INT_FIELDS = {"max_seq_len", "seed", "num_proc", "max_rows"}
_BOOL_FIELDS = {"packing", "train_on_prompt", "skip_bad_rows"}
_FLOAT_FIELDS = {"eval_fraction", "weight"}
_STR_FIELDS = {"path", "format", "template", "truncation", "cache_dir", "system_prompt", "empty_response", "hub",
               "split", "name", "revision"}


def _check_types(d: dict, where: str) -> None:
    """YAML happily yields "512" or "yes"; fail here with the key's name instead of deep inside the pipeline."""
    for key, val in d.items():
        if val is None:
            continue
        if key in _INT_FIELDS and (isinstance(val, bool) or not isinstance(val, int)):
            raise ValueError(f"{where}.{key} must be an integer, got {val!r}")
        if key in _BOOL_FIELDS and not isinstance(val, bool):
            raise ValueError(f"{where}.{key} must be true or false, got {val!r}")
        if key in _FLOAT_FIELDS and (isinstance(val, bool) or not isinstance(val, (int, float))):
            raise ValueError(f"{where}.{key} must be a number, got {val!r}")
        if key in _STR_FIELDS and not isinstance(val, str):
            raise ValueError(f"{where}.{key} must be a string, got {val!r}")


def _check_keys(d: dict, cls, where: str, *, required: str) -> None:
    """Unknown keys raise (typos must not pass silently), the required key must be there, values type-checked."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(known)}")
    if required not in d:
        raise ValueError(f"{where}: missing required key `{required}`")
    _check_types(d, where)


def _source_from(item, where: str) -> DataSource:
    if isinstance(item, DataSource):
        return item
    path = item.get("path") if isinstance(item, dict) else item
    if isinstance(path, str) and not path.strip():  # Path("") is the cwd: it always "exists"
        raise ValueError(f"{where}{'' if isinstance(item, str) else '.path'}: expected a file or directory, got an "
                         "empty path")
    if isinstance(item, str):
        return DataSource(path=item)
    if not isinstance(item, dict):
        raise ValueError(f"{where}: expected a path or a mapping with `path`, got {type(item).__name__}")
    _check_keys(item, DataSource, where, required="hub" if "hub" in item else "path")
    return DataSource(**item)


def data_config_from_dict(d: dict) -> DataConfig:
    """Build a DataConfig from the recipe's `data:` mapping; unknown keys raise (typos must not pass silently).

    A source may be a bare path string or a mapping ``{path, format, weight, max_rows}`` or
    ``{hub, split, name, revision, format, weight, max_rows}``.
    """
    if not isinstance(d, dict):
        raise ValueError(f"data: expected a mapping, got {type(d).__name__}")
    _check_keys(d, DataConfig, "data", required="sources")
    kwargs = dict(d)
    for key in ("sources", "eval_sources"):
        items = kwargs.get(key) or []
        if isinstance(items, (str, dict)):
            items = [items]
        kwargs[key] = [_source_from(x, f"data.{key}[{i}]") for i, x in enumerate(items)]
    return DataConfig(**kwargs)
