"""`python -m optsearch.cli` (what `worker --devices` starts per device)."""

import sys

from optsearch.cli.main import main

sys.exit(main())
