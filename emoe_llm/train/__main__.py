"""``python -m emoe_llm.train`` == ``train.py`` (used by ``emoe-llm train`` so an installed package needs no repo)."""

import sys

from .recipe import cli

sys.exit(cli())
