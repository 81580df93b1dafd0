"""Server-side dataset paths through the sidebar: only directories under $INFLUENCE_DATA_ROOTS.

``..``, absolute paths elsewhere and symlinks that lead out are refused with a message in the
sidebar; the pages go on with the bundled demo, and an escaping symlink is not even offered.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from dashboard.services import InfluenceExplorerError
from dashboard.services.settings import DATA_ROOTS_ENV, DEMO_SPEC, dataset_choices, load_dataset

Factory = Callable[[], AppTest]


@pytest.fixture
def roots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """A data root holding one real ImageFolder and a symlink out to a private directory."""
    root = tmp_path / "datasets"
    for split, count in (("train", 3), ("test", 1)):
        for label in ("cats", "dogs"):
            folder = root / "pets" / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.full((8, 8, 3), 40 * i + (0 if label == "cats" else 120), np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    private = tmp_path / "private"
    (private / "train" / "secrets").mkdir(parents=True)
    (root / "escape").symlink_to(private, target_is_directory=True)
    monkeypatch.setenv(DATA_ROOTS_ENV, str(root))
    return {"root": root, "private": private, "missing": tmp_path / "no-such-dir"}


def _sidebar_errors(at: AppTest) -> list[str]:
    return [e.value for e in at.sidebar.error]


def _explains_the_demo(at: AppTest) -> None:
    assert at.session_state["state_settings"].dataset == DEMO_SPEC
    assert any(s.value == "Test image #0" for s in at.subheader)
    assert [b.key for b in at.button if b.key and b.key.startswith("explain_inspect_svm_")]


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("dotdot", "contains '..'"),
        ("dotdot_inside_then_out", "contains '..'"),
        ("absolute_elsewhere", "is outside the allowed dataset directories"),
        ("absolute_missing", "is outside the allowed dataset directories"),
        ("escaping_symlink", "is outside the allowed dataset directories"),
        ("root_itself_parent", "is outside the allowed dataset directories"),
    ],
)
def test_paths_outside_the_roots_are_refused_with_a_message(
    make_app: Factory, roots: dict[str, Path], kind: str, expected: str
) -> None:
    path = {
        "dotdot": "../private",
        "dotdot_inside_then_out": "pets/../../private",
        "absolute_elsewhere": str(roots["private"]),
        "absolute_missing": str(roots["missing"]),
        "escaping_symlink": "escape",
        "root_itself_parent": str(roots["root"].parent),
    }[kind]
    at = make_app().run()
    at.text_input(key="side_dataset_path").input(path).run()
    assert not at.exception
    (message,) = _sidebar_errors(at)
    assert expected in message and "Using the bundled demo instead." in message
    # Nothing about the private directory's contents reaches the page.
    assert "secrets" not in message
    _explains_the_demo(at)
    # And the page goes on working.
    at.button(key="explain_pick_1").click().run()
    assert not at.exception
    assert any(s.value == "Test image #1" for s in at.subheader)


def test_an_escaping_symlink_is_not_offered_but_a_real_dataset_is(
    make_app: Factory, roots: dict[str, Path]
) -> None:
    specs = [choice.spec for choice in dataset_choices()]
    assert str(roots["root"] / "pets") in specs
    assert not any("escape" in spec or "private" in spec for spec in specs)
    at = make_app().run()
    options = at.selectbox(key="side_dataset").options
    assert any(option.startswith("pets") for option in options)
    assert not any("escape" in option for option in options)


def test_without_roots_no_path_can_be_given(
    make_app: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(DATA_ROOTS_ENV, raising=False)
    at = make_app().run()
    assert not at.exception
    assert not [t for t in at.text_input if t.key == "side_dataset_path"]
    assert any(DATA_ROOTS_ENV in c.value for c in at.sidebar.caption)
    with pytest.raises(InfluenceExplorerError, match="No dataset directories"):
        load_dataset("/tmp", 64)


def test_a_link_inside_a_dataset_leading_out_is_refused(
    make_app: Factory, roots: dict[str, Path]
) -> None:
    # The dataset itself is inside the root; one of its class folders links to a private directory.
    # Before, only the dataset's own path was checked: the private images became training data.
    (roots["private"] / "train" / "secrets" / "passport.png").write_bytes(
        _png(np.full((8, 8, 3), 7, np.uint8))
    )
    (roots["root"] / "pets" / "train" / "leak").symlink_to(
        roots["private"] / "train" / "secrets", target_is_directory=True
    )
    at = make_app().run()
    at.text_input(key="side_dataset_path").input("pets").run()
    assert not at.exception
    (message,) = _sidebar_errors(at)
    assert "train/leak" in message and "symbolic link" in message
    assert "secrets" not in message and "passport" not in message and "private" not in message
    _explains_the_demo(at)


def test_class_and_file_names_that_are_not_utf8_are_shown_not_crashed_on(
    make_app: Factory, roots: dict[str, Path]
) -> None:
    # Latin-1 names from an old archive: every page used to fail with a UnicodeEncodeError.
    root = os.fsencode(roots["root"] / "latin1")
    for split, count in ((b"train", 3), (b"test", 1)):
        for index, name in enumerate((b"caf\xe9", b"cr\xe8me")):
            folder = os.path.join(root, split, name)
            os.makedirs(folder)
            for i in range(count):
                pixels = np.full((8, 8, 3), 40 * i + 120 * index, np.uint8)
                with open(os.path.join(folder, b"\xff%d.png" % i), "wb") as handle:
                    handle.write(_png(pixels))
    at = make_app().run()
    at.text_input(key="side_dataset_path").input("latin1").run()
    assert not at.exception, at.exception
    assert not _sidebar_errors(at)
    assert at.session_state["state_settings"].dataset == "latin1"
    options = at.multiselect(key="side_classes").options
    assert sorted(options) == ["All 2 classes", "caf\\xe9", "cr\\xe8me"]


def _png(pixels: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()
