"""A prepared artifact cache for the dashboard tests (AppTest and browser), built once per run.

The first build of the default explainer on the bundled demo computes backbone features (about a
minute, more on a busy machine); afterwards it loads in seconds. The tests point
``INFLUENCE_CACHE_DIR`` here so the app under test finds the features ready:

- ``$INFLUENCE_CACHE_DIR`` if set (CI sets it to ``.cache/influence`` inside the clone), else
- ``<repo>/.cache/influence`` (gitignored), so repeated local runs stay fast.

The store checks every file it reads and rebuilds damaged ones, so reusing it across runs is safe.
"""

from __future__ import annotations

import os
from pathlib import Path

from core.store import ENV_CACHE_DIR

REPO = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    configured = os.environ.get(ENV_CACHE_DIR)
    return Path(configured).expanduser() if configured else REPO / ".cache" / "influence"


def prepare_default_explainer(directory: Path) -> None:
    """Build (or load) the default explainer on the demo once, filling ``directory``."""
    from core.data import load_demo
    from core.explainer import Explainer, ExplainerConfig
    from core.store import ArtifactStore

    directory.mkdir(parents=True, exist_ok=True)
    Explainer(load_demo(), ExplainerConfig(), store=ArtifactStore(directory)).prepare()
