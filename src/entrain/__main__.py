"""`python -m entrain` (what torchrun launches) is the `entrain` command."""

import sys

from entrain.cli import main

sys.exit(main())
