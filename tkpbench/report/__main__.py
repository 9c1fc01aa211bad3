"""``python -m tkpbench.report``: the report command (tkpbench.report.command)."""

import sys

from tkpbench.report.command import main

sys.exit(main())
