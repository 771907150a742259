"""``python -m rome_lens``: the command line."""

import sys

from rome_lens.cli import main

if __name__ == "__main__":
    sys.exit(main())
