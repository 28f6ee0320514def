"""``python -m fastguide.bench`` (same as ``python -m fastguide bench``)."""

import sys

from .cli import main

sys.exit(main())
