"""DeepSpeed ZeRO-3 fine-tuning (dense or EMoE): the recipe, its typed config, checkpoints and export."""

__all__ = ["ConfigError", "RecipeConfig", "fill_ds_config", "load_config", "load_ds_config", "resolve_batch"]


def __getattr__(name: str):
    # Lazy, so `emoe-llm train` (emoe_llm.train.launch) starts the launcher without importing torch (~3 s) first.
    if name in __all__:
        from . import config

        return getattr(config, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
