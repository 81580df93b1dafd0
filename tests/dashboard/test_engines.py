"""Datasets under the configured roots, refused paths, and a preparation that fails."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from core.errors import NotPositiveDefiniteError
from dashboard.services import engines
from dashboard.services.settings import DATA_ROOTS_ENV, DEMO_SPEC

Factory = Callable[[], AppTest]


def _image_folder(root: Path) -> Path:
    """A tiny ImageFolder: bright discs vs bright squares on black, 32x32 RGB."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:32, :32]
    for split, count in (("train", 8), ("test", 3)):
        for shape in ("disc", "square"):
            folder = root / split / shape
            folder.mkdir(parents=True)
            for i in range(count):
                cy, cx, r = rng.integers(10, 22), rng.integers(10, 22), rng.integers(4, 9)
                if shape == "disc":
                    mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
                else:
                    mask = (abs(yy - cy) <= r) & (abs(xx - cx) <= r)
                pixels = np.zeros((32, 32, 3), dtype=np.uint8)
                pixels[mask] = rng.integers(150, 256, size=3)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


@pytest.fixture
def data_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "datasets"
    _image_folder(root / "shapes")
    outside = tmp_path / "outside"
    _image_folder(outside)
    (root / "escape").symlink_to(outside, target_is_directory=True)
    monkeypatch.setenv(DATA_ROOTS_ENV, str(root))
    return root


def test_a_directory_under_a_data_root_is_offered_and_explained(
    make_app: Factory, data_root: Path
) -> None:
    at = make_app().run()
    dataset = at.selectbox(key="side_dataset")
    offered = list(dataset.options)
    assert any("shapes" in option for option in offered)
    assert not any("escape" in option for option in offered)
    dataset.set_value(str(data_root / "shapes")).run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    settings = at.session_state["state_settings"]
    assert settings.dataset == str(data_root / "shapes")
    assert at.multiselect(key="side_classes").value == [0, 1]
    assert any(m.value.startswith("**Most helpful**") for m in at.markdown)


@pytest.mark.parametrize(
    ("path", "message"),
    [("../shapes", "contains '..'"), ("escape", "outside the allowed"), ("nowhere", "not exist")],
)
def test_a_refused_path_says_why_and_the_demo_is_used(
    make_app: Factory, data_root: Path, path: str, message: str
) -> None:
    at = make_app().run()
    at.text_input(key="side_dataset_path").input(path).run()
    assert not at.exception
    assert any(message in e.value and "bundled demo" in e.value for e in at.sidebar.error)
    assert at.session_state["state_settings"].dataset == DEMO_SPEC
    assert any(m.value.startswith("**Most helpful**") for m in at.markdown)


DAMPING_HINT = (
    "\n\n**In this dashboard:** choose a larger *Damping* in the sidebar under *Advanced*."
)


def test_a_failed_preparation_shows_the_message_and_can_be_retried(
    make_app: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(*args: object, **kwargs: object) -> None:
        raise NotPositiveDefiniteError("The Hessian is not positive definite; add damping.")

    monkeypatch.setattr(engines, "Explainer", failing)
    at = make_app().run()
    assert not at.exception
    # The engine's message, then which sidebar control fixes it.
    assert [e.value for e in at.main.error] == [
        "The Hessian is not positive definite; add damping." + DAMPING_HINT
    ]
    assert at.button(key="state_retry_preparation")
    monkeypatch.undo()
    at.button(key="state_retry_preparation").click().run()
    assert not at.exception and not at.error
    assert any(m.value.startswith("**Most helpful**") for m in at.markdown)


def test_a_domain_error_while_explaining_is_shown_on_every_page(
    make_app: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.errors import SolverDivergedError
    from core.explainer import Explainer

    def diverging(self: Explainer, **kwargs: object) -> None:
        raise SolverDivergedError("LiSSA diverged; increase damping or use the exact solver.")

    monkeypatch.setattr(Explainer, "explain", diverging)
    at = make_app().run()
    for script in ("app_pages/explain.py", "app_pages/compare.py"):
        at.switch_page(script).run()
        assert not at.exception
        assert [e.value for e in at.main.error] == [
            "LiSSA diverged; increase damping or use the exact solver." + DAMPING_HINT
        ]
