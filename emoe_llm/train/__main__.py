"""``python -m emoe_llm.train`` == ``train.py`` (used by ``emoe-llm train`` so an installed package needs no repo)."""

from ..cli import exit_after
from .recipe import cli

exit_after(cli())
