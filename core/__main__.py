"""``python -m core`` is the ``influence`` command."""

import sys

from core.cli import main

sys.exit(main())
