"""``python -m broadcast.bench`` is ``broadcast-bench``."""

import sys

from broadcast.bench.command import main

sys.exit(main())
