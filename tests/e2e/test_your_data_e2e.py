"""Your data in a real browser: upload a zipped ImageFolder and a network's weights, wait for the
three models, and see each model's helpful and harmful training images for a test image and for
an uploaded image; then open the link in a new session and delete the dataset.

The dataset is tiny (two classes, 16 + 4 images each, 32x32) and the network small
(shufflenet_v2_x0_5), so preparing the three models takes seconds on an idle machine.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from core.archive import DatasetUploads
from core.store import ArtifactStore
from tests.e2e.conftest import Server
from tests.e2e.test_dashboard_e2e import READY_TIMEOUT, no_exception, screenshot, wait_idle
from tests.prepared_cache import cache_dir
from tests.your_data_files import ARCHITECTURE, image_folder_zip, state_dict_file

pytestmark = pytest.mark.e2e

MODELS = ("svm", "logreg", "network")


@pytest.fixture(autouse=True)
def _patient_expect() -> None:
    from playwright.sync_api import expect

    expect.set_options(timeout=60_000)


def _upload(page: Any, key: str, name: str, data: bytes) -> None:
    page.locator(f".st-key-{key} [data-testid='stFileUploaderDropzoneInput']").set_input_files(
        files=[{"name": name, "mimeType": "application/octet-stream", "buffer": data}]
    )
    wait_idle(page)


def _expect_three_models_explained(page: Any) -> None:
    from playwright.sync_api import expect

    for key in MODELS:
        column = page.locator(f".st-key-explain_model_{key}")
        expect(column.get_by_text("Most helpful")).to_be_visible(timeout=READY_TIMEOUT)
        expect(column.get_by_text("Most harmful")).to_be_visible()
        expect(column.locator('[class*="st-key-explain_inspect_"]')).to_have_count(20)
        expect(column.get_by_test_id("stImage").first).to_be_visible()


def _stored() -> list[Path]:
    """What the store holds of uploaded datasets (its staging directory aside)."""
    root = cache_dir() / "datasets"
    return sorted(p for p in root.glob("*") if p.name != ".incoming") if root.is_dir() else []


def _choose(page: Any, key: str, option: str) -> None:
    page.locator(f".st-key-{key} [data-testid='stSelectbox']").click()
    # Typed only once the list is open, so no key reaches whatever had the focus before.
    page.get_by_role("listbox").wait_for(timeout=READY_TIMEOUT)
    page.keyboard.type(option)  # filters a long list down to the option
    page.get_by_role("option", name=option, exact=True).click()
    wait_idle(page)


def _images_per_list(page: Any) -> str:
    """The sidebar's k, as its slider says."""
    return page.locator(".st-key-side_k input[type='range']").input_value()


def test_upload_a_dataset_and_a_network_then_explain_with_three_models(
    page: Any, browser: Any, app_server: Server
) -> None:
    upload_then_explain_with_three_models(page, browser, app_server)


def upload_then_explain_with_three_models(page: Any, browser: Any, server: Server) -> None:
    """A user's whole path on Your data against ``server``: a network that does not fit, then
    one that does, a dataset, the three models, a test image and an upload explained, the link
    in a new session, the dataset deleted."""
    from playwright.sync_api import expect

    page.goto(f"{server.url}/your-data")
    page.get_by_test_id("stSidebar").wait_for(timeout=READY_TIMEOUT)
    wait_idle(page)
    expect(page.get_by_text("A zip of at most 500 MB")).to_be_visible()
    # Ten per list by default; once (in a full CI run) the explanations came with k = 1 and the
    # cause was not kept, so the steps below check that k is untouched and say where it moved.
    assert _images_per_list(page) == "10", page.url

    # The network first, then the data: the models are then prepared once, with all three.
    # Under the default architecture (resnet18) the weights do not fit: a message, nothing kept.
    _choose(page, "yours_input_size", "32")
    _upload(page, "yours_weights", "garments_shufflenet.pt", state_dict_file())
    # The page's own message (once, in a full CI run, the sidebar showed an error alert of its
    # own at the same moment, which made an unscoped locator ambiguous; its text was not kept).
    error = page.get_by_test_id("stMainBlockContainer").get_by_test_id("stAlertContentError")
    expect(error).to_contain_text("does not fit the resnet18 architecture", timeout=READY_TIMEOUT)
    expect(error).to_contain_text("garments_shufflenet.pt")
    assert ".incoming" not in error.inner_text()  # the server's paths are not shown
    _choose(page, "yours_architecture", ARCHITECTURE)
    expect(page.get_by_text("garments_shufflenet.pt — shufflenet_v2_x0_5")).to_be_visible(
        timeout=READY_TIMEOUT
    )
    _upload(page, "yours_zip", "garments.zip", image_folder_zip())
    expect(page.get_by_text("garments — 2 classes, 32 training and 8 test images")).to_be_visible(
        timeout=READY_TIMEOUT
    )
    table = page.locator(".st-key-yours_models")
    expect(table.get_by_text("Your network's last layer")).to_be_visible(timeout=READY_TIMEOUT)
    expect(table.locator("tbody tr")).to_have_count(3)
    expect(page.get_by_text("with every lower layer frozen")).to_be_visible()
    no_exception(page)
    screenshot(page, "your-data")
    assert "data=" in page.url and "net=" in page.url
    link = page.url

    assert _images_per_list(page) == "10", f"k moved while uploading: {page.url}"

    # Explain: a test image of the uploaded dataset, then an uploaded image, three models each.
    page.get_by_text("Explain its test images or an upload").click()
    wait_idle(page)
    assert _images_per_list(page) == "10", f"k moved on the way to Explain: {page.url}"
    _expect_three_models_explained(page)
    no_exception(page)
    photo = io.BytesIO()
    Image.new("RGB", (40, 40), (200, 200, 200)).save(photo, "PNG")
    _upload(page, "explain_upload", "grey.png", photo.getvalue())
    expect(page.get_by_role("heading", name="Uploaded grey.png")).to_be_visible(timeout=60_000)
    _expect_three_models_explained(page)
    no_exception(page)
    screenshot(page, "your-data-upload-explained")

    # A new session with the link sees the same data; deleting it removes it from the server.
    other = browser.new_context(viewport={"width": 1500, "height": 1100})
    try:
        visitor = other.new_page()
        visitor.set_default_timeout(60_000)
        visitor.goto(link)
        visitor.get_by_test_id("stSidebar").wait_for(timeout=READY_TIMEOUT)
        wait_idle(visitor)
        expect(visitor.locator(".st-key-yours_models").get_by_text("Your network's last layer"))
        visitor.locator(".st-key-yours_delete_dataset button").click()
        wait_idle(visitor)
        expect(visitor.get_by_text("Upload a dataset first")).to_be_visible()
        no_exception(visitor)
    finally:
        other.close()
    content_hash = link.split("data=")[1].split("&")[0]
    with pytest.raises(Exception, match="No uploaded dataset"):
        DatasetUploads(ArtifactStore(cache_dir())).get(content_hash)


def test_a_hostile_zip_gets_a_message_and_nothing_is_kept(page: Any, app_server: Server) -> None:
    from playwright.sync_api import expect

    page.goto(f"{app_server.url}/your-data")
    page.get_by_test_id("stSidebar").wait_for(timeout=READY_TIMEOUT)
    wait_idle(page)
    before = _stored()
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as out:
        out.writestr("../evil/train/a/1.png", b"x")
    _upload(page, "yours_zip", "evil.zip", archive.getvalue())
    expect(page.get_by_test_id("stAlertContentError")).to_be_visible(timeout=60_000)
    no_exception(page)
    assert _stored() == before
