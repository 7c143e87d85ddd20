"""`python -m mmdistill` (also how torchrun launches it)."""
import sys

from .cli import main

sys.exit(main())
