"""``python -m flatlab``: the command line (what ``torchrun ... -m flatlab run NAME`` runs)."""

import sys

from flatlab.cli import main

sys.exit(main())
