"""`python -m stepflash <verb>` (and `torchrun -m stepflash <verb>`)."""

import sys

from stepflash.cli import main

sys.exit(main())
