"""``python -m emoe_llm.data`` = ``python -m emoe_llm.data.inspect``."""

import sys

from .inspect import main

sys.exit(main())
