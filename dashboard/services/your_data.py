"""The "Your data" area: a dataset uploaded as a zip and a network uploaded as a file, owned by
the session that uploaded them and by whoever opens a link naming them.

Both are kept by core in the artifact store under their content hash (``core.archive`` for
datasets, ``core.user_network`` for network files), checked before anything is stored, and a
refused upload leaves nothing behind. Nothing here lists the store: a session reaches an uploaded
dataset only by uploading it or by a link that carries its 64-hex-digit hash
(``?data=<hash>``, with ``&net=<hash>`` for the network), so one user's data is never offered to
another. The sidebar then offers the dataset as "upload:<hash>" and, with a network, the
explainer gets the third model.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import IO

import streamlit as st

from core.archive import DatasetUploads, StoredDataset, UploadLimits
from core.errors import InfluenceExplorerError
from core.user_network import WHAT_IS_EXPLAINED, NetworkUploads, StoredNetwork, architecture_names
from dashboard.services.settings import (
    UPLOAD_PREFIX,
    Settings,
    forget_loaded_datasets,
    uploaded_dataset_hash,
    uploaded_network_spec,
)

#: What an upload may be (core's defaults, stated on the page before anything is uploaded).
LIMITS = UploadLimits()
#: Architectures offered for a state dict (torchvision's classification models).
ARCHITECTURES: tuple[str, ...] = tuple(architecture_names())
#: Input sizes offered for a state dict; None = from torchvision's weight metadata (224 mostly).
INPUT_SIZES: tuple[int | None, ...] = (None, 32, 64, 96, 128, 224, 299)
#: The link's parameters: the uploaded dataset's and network's content hashes.
DATA_PARAM, NETWORK_PARAM = "data", "net"

_HASH = re.compile(r"^[0-9a-f]{64}$")
# Where core stages an uploaded network file while checking it.
_STAGED = re.compile(r"\S*/\.incoming/[^/\s]+?\.pt2?\b")
# Session-state keys owned by this module.
_MINE = "state_your_data"
_LINK_READ = "state_your_data_link_read"
_NOTICE = "state_your_data_notice"
# The sidebar's dataset to show next run (set before its widget is drawn; None = its default).
_PENDING = "state_your_data_pending"

__all__ = [
    "ARCHITECTURES",
    "INPUT_SIZES",
    "LIMITS",
    "WHAT_IS_EXPLAINED",
    "Mine",
    "add_dataset",
    "add_network",
    "apply_to_settings",
    "dataset_option",
    "delete_dataset",
    "forget_network",
    "link_query",
    "literal",
    "mine",
    "network_sets_size",
    "publish_link",
    "read_link",
    "server_upload_limit_mb",
    "stored_dataset",
    "stored_network",
    "use_my_dataset",
    "widget_limit_mb",
]


@dataclass(frozen=True)
class Mine:
    """What this session has uploaded (or opened by link): content hashes, or None."""

    dataset: str | None = None
    network: str | None = None


def mine() -> Mine:
    value = st.session_state.get(_MINE)
    return value if isinstance(value, Mine) else Mine()


def _set_mine(value: Mine) -> None:
    st.session_state[_MINE] = value


def literal(name: str) -> str:
    """A user's file or folder name as a Markdown code span: shown as typed, never rendered as
    a link, emphasis or LaTeX."""
    cleaned = "".join(ch for ch in str(name) if ch.isprintable() and ch != "`")[:80]
    return f"`{cleaned or '?'}`"


def server_upload_limit_mb() -> int:
    """The server's own per-file upload limit (``server.maxUploadSize``, MB), which caps every
    upload widget whatever the archive checks would allow."""
    return int(st.get_option("server.maxUploadSize"))


def widget_limit_mb(core_limit_bytes: int) -> int:
    """An upload widget's limit in MB: core's limit, capped by the server's."""
    return max(1, min(core_limit_bytes // 2**20, server_upload_limit_mb()))


# --------------------------------------------------------------------------- uploading
Progress = Callable[[str, int, int], None]


def add_dataset(file: IO[bytes], progress: Progress) -> StoredDataset:
    """Check, unpack and keep an uploaded zip; it becomes this session's dataset.

    Raises:
        InfluenceExplorerError: refused (the message says why); nothing is kept.
    """
    # Named after the zip's top folder, else its file name (core decides; shown, never a path).
    stored = DatasetUploads(limits=LIMITS).add_zip(file, progress=progress)
    _set_mine(replace(mine(), dataset=stored.content_hash))
    _select_dataset(stored.content_hash)
    return stored


def add_network(
    data: bytes, filename: str, architecture: str | None, input_size: int | None
) -> StoredNetwork:
    """Check and keep an uploaded network file; it becomes this session's network.

    Raises:
        InfluenceExplorerError: refused (the message says why); nothing is kept.
    """
    if len(data) > LIMITS.max_weights_bytes:
        raise InfluenceExplorerError(
            f"The network file is larger than {LIMITS.max_weights_bytes // 2**20} MB."
        )
    try:
        stored = NetworkUploads().add(
            data, filename=filename, architecture=architecture, input_size=input_size
        )
    except InfluenceExplorerError as error:
        # Core names the file by the temporary path it checked; the user knows it by its name.
        message = _STAGED.sub(lambda _: literal(filename), str(error))
        raise InfluenceExplorerError(message) from None
    _set_mine(replace(mine(), network=stored.content_hash))
    return stored


def stored_dataset(content_hash: str) -> StoredDataset | None:
    try:
        return DatasetUploads(limits=LIMITS).get(content_hash)
    except InfluenceExplorerError:
        return None


def stored_network(content_hash: str) -> StoredNetwork | None:
    try:
        return NetworkUploads().get(content_hash)
    except InfluenceExplorerError:
        return None


def delete_dataset() -> bool:
    """Delete this session's dataset from the server (for everyone holding its link too)."""
    current = mine()
    if current.dataset is None:
        return False
    existed = DatasetUploads(limits=LIMITS).delete(current.dataset)
    _set_mine(replace(current, dataset=None))
    if uploaded_dataset_hash(st.session_state.get("side_dataset", "")) == current.dataset:
        st.session_state[_PENDING] = None
    # Its decoded images go with the loaded-dataset cache (other datasets reload from disk).
    forget_loaded_datasets()
    return existed


def forget_network(delete: bool) -> bool:
    """Stop using this session's network; ``delete`` also removes its file from the server."""
    current = mine()
    if current.network is None:
        return False
    existed = NetworkUploads().delete(current.network) if delete else True
    if delete:
        uploaded_network_spec.clear()
    _set_mine(replace(current, network=None))
    return existed


# --------------------------------------------------------------------------- the sidebar's view
def dataset_option() -> tuple[str, str] | None:
    """The sidebar's option for this session's dataset: (spec, label), or None."""
    current = mine()
    if current.dataset is None:
        return None
    stored = stored_dataset(current.dataset)
    if stored is None:
        return None
    return UPLOAD_PREFIX + current.dataset, f"Your data: {stored.name} ({current.dataset[:8]})"


def apply_to_settings(settings: Settings) -> Settings:
    """The settings with this session's network, when the sidebar's dataset is its upload, and
    the image size the network takes."""
    current = mine()
    if current.network is None or uploaded_dataset_hash(settings.dataset) != current.dataset:
        return settings
    network = stored_network(current.network)
    if network is None:
        return settings
    size = max(network.info.preprocessing.input_size)
    return replace(settings, network=current.network, image_size=size)


def network_sets_size(spec: str) -> bool:
    """Whether this session's network decides the image size of the dataset ``spec``."""
    current = mine()
    return current.network is not None and uploaded_dataset_hash(spec) == current.dataset


def _select_dataset(content_hash: str) -> None:
    # Applied by read_link on the next run, before the sidebar's picker is drawn (a widget's
    # value cannot change once it is drawn).
    st.session_state[_PENDING] = UPLOAD_PREFIX + content_hash


def use_my_dataset() -> None:
    """Show this session's uploaded dataset from the next run on."""
    if mine().dataset is not None:
        _select_dataset(mine().dataset)


# --------------------------------------------------------------------------- links
def stored_dataset_exists(content_hash: str) -> bool:
    """Whether a link's ``data`` names a dataset this server holds."""
    return bool(_HASH.match(content_hash)) and stored_dataset(content_hash) is not None


def read_link() -> str | None:
    """Adopt the dataset and network a link names (once per session, before the sidebar).

    Returns a notice for the page when the link names something this server does not have.
    """
    if _PENDING in st.session_state:
        pending = st.session_state.pop(_PENDING)
        if pending is None:
            st.session_state.pop("side_dataset", None)
        else:
            st.session_state["side_dataset"] = pending
    if st.session_state.get(_LINK_READ):
        return st.session_state.pop(_NOTICE, None)
    st.session_state[_LINK_READ] = True
    data = st.query_params.get(DATA_PARAM)
    net = st.query_params.get(NETWORK_PARAM)
    if not data:
        return None
    if not (_HASH.match(data) and stored_dataset(data) is not None):
        st.session_state[_NOTICE] = (
            "The link names an uploaded dataset this server does not have (it may have been "
            "deleted); showing the bundled demo."
        )
        return st.session_state[_NOTICE]
    network = net if net and _HASH.match(net) and stored_network(net) is not None else None
    _set_mine(Mine(dataset=data, network=network))
    st.session_state["side_dataset"] = UPLOAD_PREFIX + data
    if net and network is None:
        st.session_state[_NOTICE] = (
            "The link names an uploaded network this server does not have; showing the dataset "
            "without it."
        )
        return st.session_state[_NOTICE]
    return None


def link_query(settings: Settings) -> dict[str, str]:
    """The link's parameters for this session's uploaded dataset and network, if shown."""
    content_hash = uploaded_dataset_hash(settings.dataset)
    if content_hash is None:
        return {}
    params = {DATA_PARAM: content_hash}
    if settings.network is not None:
        params[NETWORK_PARAM] = settings.network
    return params


def publish_link(settings: Settings) -> None:
    """Keep ``data``/``net`` in the address while the uploaded dataset is shown."""
    wanted = link_query(settings)
    for name in (DATA_PARAM, NETWORK_PARAM):
        if name in wanted:
            if st.query_params.get(name) != wanted[name]:
                st.query_params[name] = wanted[name]
        elif name in st.query_params:
            with contextlib.suppress(KeyError):
                del st.query_params[name]
