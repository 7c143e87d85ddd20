"""`python -m mmdistill` (also how torchrun launches it)."""

import sys

from mmdistill.cli import main

sys.exit(main())
