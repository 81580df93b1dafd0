"""``python -m core`` is the ``influence`` command."""

import sys

from core.cli import main

# The guard matters: a local Dask cluster (--cluster local:N) starts its workers as new Python
# processes, which import this module again.
if __name__ == "__main__":
    sys.exit(main())
