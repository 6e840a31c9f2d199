"""``python -m emoe_llm.train`` == ``train.py`` (used by ``emoe-llm train`` so an installed package needs no repo)."""

from .recipe import cli, exit_after

exit_after(cli())
