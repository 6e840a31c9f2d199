"""DeepSpeed ZeRO-3 fine-tuning (dense or EMoE): the recipe, its typed config, checkpoints and export."""

from .config import ConfigError, RecipeConfig, fill_ds_config, load_config, load_ds_config, resolve_batch

__all__ = ["ConfigError", "RecipeConfig", "fill_ds_config", "load_config", "load_ds_config", "resolve_batch"]
