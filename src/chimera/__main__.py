"""``python -m chimera`` runs the ``chimera`` command."""

import sys

from chimera.cli import main

sys.exit(main())
