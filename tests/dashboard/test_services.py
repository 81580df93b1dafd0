"""The dashboard's services on their own: frozen settings as cache keys, the run-and-remember
helper, the models as a collection, and the rules that keep pages thin."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import streamlit as st

from dashboard.services import engines, facts, query
from dashboard.services.runs import SessionRuns
from dashboard.services.settings import Settings
from tests.prepared_cache import REPO

DASHBOARD = REPO / "dashboard"


# ---------------------------------------------------------------- settings key the caches


def test_equal_settings_hit_one_cache_entry_and_different_ones_do_not() -> None:
    computed: list[Settings] = []

    @st.cache_data(max_entries=8, show_spinner=False)
    def cached(settings: Settings) -> int:
        computed.append(settings)
        return len(computed)

    # Built apart, and from values of other types (0 vs 0.0, a list of classes): equal settings.
    assert Settings(damping=0, classes=[0, 6], k=10.0) == Settings()
    assert cached(Settings()) == cached(Settings(damping=0, classes=[0, 6], k=10.0)) == 1
    assert cached(Settings(k=5)) == 2
    assert cached(Settings(damping=1e-3)) == 3
    assert cached(Settings(classes=(6, 0))) == 4
    assert len(computed) == 4


def test_the_engine_is_the_part_of_the_settings_that_identifies_an_explainer() -> None:
    computed: list[object] = []

    @st.cache_data(max_entries=8, show_spinner=False)
    def per_engine(engine: object) -> int:
        computed.append(engine)
        return len(computed)

    # k and the estimate change what is asked of an engine, not the engine.
    same = Settings(k=3, estimate="first_order").engine
    assert same == Settings().engine
    assert per_engine(Settings().engine) == per_engine(same) == 1
    assert per_engine(Settings(solver="cg").engine) == 2
    assert per_engine(Settings(max_train_per_class=500).engine) == 3


def test_equal_settings_share_one_shared_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[object] = []

    def build(dataset: object, config: object, **kwargs: object) -> SimpleNamespace:
        built.append(config)
        return SimpleNamespace(warnings=())

    monkeypatch.setattr(engines, "Explainer", build)
    first = engines.preparation(Settings())
    assert first.wait(60)
    assert engines.preparation(Settings(k=3, estimate="first_order", damping=0)) is first
    other = engines.preparation(Settings(damping=1e-3))
    assert other is not first
    assert other.wait(60)
    assert len(built) == 2


# ---------------------------------------------------------------- run once, remember


@pytest.fixture
def runs() -> Iterator[tuple[SessionRuns, list[str]]]:
    computed: list[str] = []

    def compute(key: str, suffix: str) -> str:
        if key == "refused":
            raise ValueError("core refused it")
        computed.append(key)
        return key + suffix

    slot = "state_test_services_runs"
    yield SessionRuns(slot, compute, limit=2), computed
    st.session_state.pop(slot, None)


def test_a_run_is_remembered_for_the_session_newest_last_and_bounded(runs) -> None:
    remembered, computed = runs
    assert remembered.remembered("a") is None
    assert remembered.run("a", "!") == "a!"
    assert remembered.remembered("a") == "a!"
    remembered.run("b", "?")
    remembered.run("a", "!")  # asked again: computed again, and now the newest
    assert remembered.remembered_keys() == ["b", "a"]
    remembered.run("c", ".")  # over the limit: the oldest goes
    assert remembered.remembered_keys() == ["a", "c"]
    assert remembered.remembered("b") is None
    assert computed == ["a", "b", "a", "c"]


def test_a_failed_run_is_not_remembered(runs) -> None:
    remembered, _ = runs
    with pytest.raises(ValueError, match="refused"):
        remembered.run("refused", "!")
    assert remembered.remembered("refused") is None
    assert remembered.remembered_keys() == []


# ---------------------------------------------------------------- models as a collection


def _explainer(predictions: dict[str, list[int]], true: list[int]) -> SimpleNamespace:
    """What the services read of an explainer, with any number of models."""
    probabilities = {key: np.eye(2)[np.asarray(p)] for key, p in predictions.items()}
    return SimpleNamespace(
        test_labels=np.asarray(true),
        class_names=("a", "b"),
        models={
            key: SimpleNamespace(label=f"Model {key}", short_label=f"M{key}") for key in predictions
        },
        test_probabilities=lambda key: probabilities[key],
    )


def test_gallery_filters_work_for_any_number_of_models() -> None:
    true = [0, 0, 1, 1, 0]
    # Image 2: every model wrong alike (misclassified, no disagreement); 1, 3, 4: one differs.
    three = _explainer({"m1": [0, 1, 0, 1, 0], "m2": [0, 0, 0, 0, 0], "m3": [0, 0, 0, 1, 1]}, true)
    assert list(query.gallery(three, "all").indices) == [0, 1, 2, 3, 4]
    assert list(query.gallery(three, "misclassified").indices) == [1, 2, 3, 4]
    assert list(query.gallery(three, "disagree").indices) == [1, 3, 4]
    gallery = query.gallery(three, "all")
    assert list(gallery.predictions) == ["m1", "m2", "m3"]
    one = _explainer({"only": [0, 1, 1, 1, 0]}, true)
    assert list(query.gallery(one, "misclassified").indices) == [1]
    assert list(query.gallery(one, "disagree").indices) == []


def test_models_keep_the_engine_s_order_and_unknown_ones_are_still_named() -> None:
    explainer = _explainer({"svm": [0], "logreg": [0], "yours": [0]}, [0])
    assert list(facts.model_labels(explainer)) == ["svm", "logreg", "yours"]
    assert facts.model_short_labels(explainer) == {
        "svm": "Msvm",
        "logreg": "Mlogreg",
        "yours": "Myours",
    }
    assert facts.default_model(explainer) == "yours"


# ---------------------------------------------------------------- thin pages


def _modules(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (DASHBOARD / folder).glob("*.py"))


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", _modules("app_pages", "components"), ids=lambda p: p.name)
def test_pages_and_components_reach_core_only_through_services(path: Path) -> None:
    assert not any(name == "core" or name.startswith("core.") for name in _imports(path))
    text = path.read_text()
    for attribute in ("explainer.dataset", "explainer.n_test", "explainer.n_train", ".models["):
        assert attribute not in text.replace("explanation.models[", ""), attribute


@pytest.mark.parametrize(
    "path", _modules(".", "app_pages", "components", "services"), ids=lambda p: p.name
)
def test_no_dashboard_module_names_a_model_or_grows_past_400_lines(path: Path) -> None:
    text = path.read_text()
    assert '"svm"' not in text and '"logreg"' not in text and "MODEL_KEYS" not in text
    assert len(text.splitlines()) <= 400
