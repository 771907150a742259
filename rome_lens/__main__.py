"""``python -m rome_lens``: the command line."""

import sys

from rome_lens.cli import main

sys.exit(main())
