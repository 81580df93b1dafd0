"""The "Your data" page in AppTest: limits stated up front, an uploaded dataset reached only by its
session or its link (never listed), three models prepared for it with a network, and deletion.

Uploading through the widget itself is covered by the browser test (tests/e2e/test_your_data_e2e);
here the files are stored through core, as the widget's handler does, and opened by link.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from core.archive import DatasetUploads
from core.store import ArtifactStore
from core.user_network import NetworkUploads
from tests.dashboard.conftest import APP, RUN_TIMEOUT, wait_for_every_model
from tests.your_data_files import ARCHITECTURE, SIZE, image_folder_zip, state_dict_file

pytestmark = pytest.mark.slow

PAGE = "app_pages/your_data.py"


@pytest.fixture(scope="module")
def files() -> dict[str, bytes]:
    return {"zip": image_folder_zip(), "weights": state_dict_file()}


@pytest.fixture
def store(prepared_cache: Path, files: dict[str, bytes]) -> Iterator[dict[str, object]]:
    """The prepared cache (the demo loads in seconds) holding one uploaded dataset and network,
    removed afterwards."""
    artifacts = ArtifactStore(prepared_cache)
    datasets, networks = DatasetUploads(artifacts), NetworkUploads(artifacts)
    dataset = datasets.add_zip(io.BytesIO(files["zip"]))
    network = networks.add(
        files["weights"], filename="net.pt", architecture=ARCHITECTURE, input_size=SIZE
    )
    yield {"dataset": dataset, "network": network, "root": prepared_cache}
    datasets.delete(dataset.content_hash)
    networks.delete(network.content_hash)


def _app(**params: str) -> AppTest:
    """A new session opened at the home page with ``params`` in its address."""
    at = AppTest.from_file(str(APP), default_timeout=RUN_TIMEOUT)
    for name, value in params.items():
        at.query_params[name] = value
    return at


def _errors(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def _text(at: AppTest) -> str:
    parts = [m.value for m in at.markdown] + [c.value for c in at.caption]
    parts += [i.value for i in at.info] + [s.value for s in at.success]
    parts += [w.value for w in at.warning]
    return "\n".join(parts)


def _dataset_options(at: AppTest) -> list[str]:
    return list(at.selectbox(key="side_dataset").options)


def test_limits_are_stated_and_other_sessions_uploads_are_not_offered(store) -> None:
    at = _app().run()
    _errors(at)
    at.switch_page(PAGE).run()
    _errors(at)
    text = _text(at)
    assert "500 MB" in text and "100,000 images" in text and "200 MB" in text
    assert "never listed" in text
    # The store holds an upload, but a session without its link is not offered it.
    assert not any("Your data" in option for option in _dataset_options(at))
    assert "Upload a dataset first" in text


def test_a_link_opens_the_dataset_with_the_three_models_and_it_can_be_deleted(store) -> None:
    dataset, network = store["dataset"], store["network"]
    at = _app(data=dataset.content_hash, net=network.content_hash).run()
    _errors(at)
    assert at.selectbox(key="side_dataset").value == f"upload:{dataset.content_hash}"
    # The upload's features are new: Explain shows the SVM first, then every model.
    first = [b.key for b in at.button if b.key and b.key.startswith("explain_inspect_svm_")]
    assert len(first) == 20
    wait_for_every_model(at)
    _errors(at)
    # Explain, the home page, shows the three models' lists for a test image of the upload.
    keys = [b.key for b in at.button if b.key and b.key.startswith("explain_inspect_")]
    for model in ("svm", "logreg", "network"):
        for kind in ("helpful", "harmful"):
            assert sum(k.startswith(f"explain_inspect_{model}_{kind}_") for k in keys) == 10
    at.switch_page(PAGE).run()
    _errors(at)
    models = at.table[0].value
    assert len(models) == 3
    assert models["model"].iloc[2].startswith("Your network's last layer")
    assert 0.0 <= float(models["agrees with your head"].iloc[2]) <= 1.0
    assert list(models["agrees with your head"].iloc[:2]) == ["—", "—"]
    text = _text(at)
    assert "every lower layer frozen" in text
    assert at.query_params["data"] == dataset.content_hash
    assert at.query_params["net"] == network.content_hash

    at.button(key="yours_delete_dataset").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert not (Path(store["root"]) / "datasets" / dataset.content_hash).exists()
    assert "Upload a dataset first" in _text(at)
    at.run()
    assert at.selectbox(key="side_dataset").value == "demo"


def test_a_link_to_a_dataset_this_server_lacks_says_so(store) -> None:
    at = _app(data="0" * 64).run()
    _errors(at)
    assert "this server does not have" in _text(at)
    assert at.selectbox(key="side_dataset").value == "demo"
