"""Hub ids for models and datasets: ``meta-llama/Llama-2-7b-hf`` where a directory is expected.

A path that exists is used as it is (a local directory always wins over a Hub id of the same spelling). Anything else
that looks like ``org/name`` is resolved with huggingface_hub's ``snapshot_download`` into the standard Hub cache
(``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``), which honours ``HF_TOKEN``. With
``HF_HUB_OFFLINE=1`` only the cache is read: nothing goes over the network, and an id that is not cached is one line
naming the id and the cache searched.

Models are fetched safetensors-only (config, tokenizer and generation files beside them): a pickle ``.bin`` can run
code when loaded, and a repo that ships both would otherwise download the weights twice.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

# org/name as the Hub spells them (letters, digits, '-', '_', '.'; neither part starts with '.' or '-')
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
TOKENIZER_FILES = ["*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "tokenizer*"]


class HubError(ValueError):
    """A Hub id that cannot be resolved: names the id, the revision and the cache searched."""


@dataclass(frozen=True)
class Resolved:
    path: Path
    repo_id: str | None = None  # None: a local directory
    commit: str | None = None  # the snapshot's commit sha (what a revision or branch resolved to)

    def record(self) -> dict:
        """What a conversion or run records about where its model came from."""
        return {"repo_id": self.repo_id, "commit": self.commit} if self.repo_id else {"path": str(self.path)}


def is_hub_id(value: str) -> bool:
    """``org/name`` that is not a local path: neither it nor its first part exists (``./org/name``, an absolute path
    or ``runs/missing`` beside an existing ``runs/`` is always local: a typo there must not become a Hub request)."""
    return isinstance(value, str) and bool(HUB_ID.match(value)) and not Path(value.split("/")[0]).exists()


def hub_cache() -> Path:
    """The cache huggingface_hub reads, from the environment *now* (its own constant is frozen at import time)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve(value: str, *, revision: str | None = None, repo_type: str = "model",
            allow_patterns: list[str] | None = None) -> Resolved:
    """A local directory, or the snapshot directory of Hub id ``value`` at ``revision`` (default: main)."""
    if not is_hub_id(value):
        if revision:
            raise HubError(f"{value}: --revision/revision pins a Hub commit, but {value} is a local path")
        return Resolved(Path(value))
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    cache = hub_cache()
    patterns = MODEL_FILES if allow_patterns is None and repo_type == "model" else allow_patterns
    at = f"@{revision}" if revision else ""
    try:
        path = snapshot_download(value, repo_type=repo_type, revision=revision, cache_dir=cache,
                                 local_files_only=offline(), allow_patterns=patterns,
                                 token=os.environ.get("HF_TOKEN") or None)
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        why = ("HF_HUB_OFFLINE=1 and it is not in the cache" if offline()
               else f"not in the cache and not reachable ({reason})")
        flag = " --repo-type dataset" if repo_type == "dataset" else ""
        raise HubError(f"{value}{at} is not a local directory, and as a Hub {repo_type} id: {why} (searched "
                       f"{cache}; download it with `hf download {value}{flag}` or set "
                       "HF_HOME/HF_HUB_CACHE to the cache that holds it)") from None
    except HfHubHTTPError as e:  # 401/404: a private or misspelt repo, an unknown revision
        raise HubError(f"{value}{at} is not a local directory, and as a Hub {repo_type} id: "
                       f"{str(e).splitlines()[0]} (a private repo needs HF_TOKEN)") from None
    path = Path(path)
    if repo_type != "model" or allow_patterns is not None:  # a dataset, or a tokenizer-only fetch
        return Resolved(path, value, path.name)
    if not (path / "config.json").is_file():
        raise HubError(f"model {value}{at}: snapshot {path} has no config.json (not a transformers checkpoint)")
    if not any(path.glob("*.safetensors")):
        raise HubError(f"model {value}{at}: snapshot {path} has no .safetensors weights; only safetensors are fetched "
                       "from the Hub (pickle .bin files can run code when loaded)")
    return Resolved(path, value, path.name)
