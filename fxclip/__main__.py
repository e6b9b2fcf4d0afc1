"""`python -m fxclip ...` runs the `fxclip` command line."""

import sys

from fxclip.cli import main

sys.exit(main())
