"""`python -m entrain` (what torchrun launches) is the `entrain` command."""

import sys

from entrain.cli import main

if __name__ == "__main__":  # not in a spawned worker process, which imports this module
    sys.exit(main())
