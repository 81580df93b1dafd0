"""Your data: upload a dataset (a zip in ImageFolder layout) and your network; every page then
shows the paper's two models and your network's last layer side by side."""

from __future__ import annotations

import streamlit as st

from dashboard.services import InfluenceExplorerError, engines, facts, your_data
from dashboard.services.settings import current_settings, uploaded_dataset_hash

_EXPORT = "torch.export program (.pt2)"

st.title("Your data")
st.markdown(
    "Bring a classifier you trained and its images. Upload the images as a **zip** with one "
    "folder per class under `train/` and `test/` (`train/<class>/*.jpg`, `test/<class>/*.jpg`; "
    "the classes are the sorted folder names, torchvision's `ImageFolder` order), then your "
    "**network**: a torchvision architecture with its state dict "
    "(`torch.save(model.state_dict(), PATH)`), or a `torch.export` program (`.pt2`). A third "
    "model joins the paper's two: **your network's last layer**, refitted on the features your "
    "network computes."
)
st.info(
    f"**Limits.** {your_data.LIMITS.describe()} This server accepts at most "
    f"{your_data.server_upload_limit_mb()} MB per uploaded file. Nothing from your files is run: "
    "weights are read as plain tensors, `.pt2` programs are checked before loading.\n\n"
    "**Privacy.** What you upload belongs to this session and to whoever opens its link (the "
    "address names it by its content hash); it is never listed to other users. You can delete "
    "it here."
)

mine = your_data.mine()
settings = current_settings()

# ---------------------------------------------------------------- 1. the dataset
st.header("1. Your dataset")
dataset = your_data.stored_dataset(mine.dataset) if mine.dataset else None
if dataset is not None:
    st.success(
        f"{your_data.literal(dataset.name)} — {len(dataset.class_names)} classes, "
        f"{sum(dataset.counts.get('train', {}).values()):,} training and "
        f"{sum(dataset.counts.get('test', {}).values()):,} test images "
        f"(content hash `{dataset.content_hash[:16]}…`)."
    )
    st.dataframe(
        {
            "class": list(dataset.class_names),
            "train": [dataset.counts.get("train", {}).get(c, 0) for c in dataset.class_names],
            "test": [dataset.counts.get("test", {}).get(c, 0) for c in dataset.class_names],
        },
        hide_index=True,
        key="yours_counts",
    )
    if st.button("Delete this dataset from the server", key="yours_delete_dataset"):
        your_data.delete_dataset()
        st.rerun()
archive = st.file_uploader(
    "Upload a dataset (.zip)" if dataset is None else "Upload another dataset (.zip)",
    type=["zip"],
    key="yours_zip",
    max_upload_size=your_data.widget_limit_mb(your_data.LIMITS.max_zip_bytes),
)
if archive is not None and st.session_state.get("state_yours_zip_done") != archive.file_id:
    st.session_state["state_yours_zip_done"] = archive.file_id
    bar = st.progress(0.0, text="Checking the archive…")

    def _progress(stage: str, done: int, total: int) -> None:
        fraction = 0.0 if total <= 0 else min(1.0, done / total)
        bar.progress(fraction, text=f"{stage} ({fraction:.0%})")

    try:
        your_data.add_dataset(archive, _progress)
    except InfluenceExplorerError as error:
        bar.empty()
        st.session_state["state_yours_zip_error"] = str(error)
    else:
        st.session_state.pop("state_yours_zip_error", None)
        st.rerun()
if st.session_state.get("state_yours_zip_error"):
    st.error(st.session_state["state_yours_zip_error"])

# ---------------------------------------------------------------- 2. the network
st.header("2. Your network")
network = your_data.stored_network(mine.network) if mine.network else None
if network is not None:
    info = network.info
    st.success(
        f"{your_data.literal(network.filename)} — {info.architecture}, {info.n_classes} classes, "
        f"{info.feature_dim}-d penultimate features (the input of {info.head}), "
        f"{info.parameters:,} parameters."
    )
    st.caption(f"Preprocessing: {info.preprocessing.describe()}.")
    if dataset is not None and info.n_classes != len(dataset.class_names):
        st.warning(
            f"Your network has {info.n_classes} outputs but the dataset has "
            f"{len(dataset.class_names)} classes; its outputs must be the dataset's classes in "
            "sorted folder order. Upload the matching network or dataset."
        )
    stop_col, delete_col = st.columns(2)
    if stop_col.button("Stop using it", key="yours_stop_network"):
        your_data.forget_network(delete=False)
        st.rerun()
    if delete_col.button("Delete it from the server", key="yours_delete_network"):
        your_data.forget_network(delete=True)
        st.rerun()
arch_col, size_col = st.columns(2)
architecture = arch_col.selectbox(
    "Architecture",
    options=[_EXPORT, *your_data.ARCHITECTURES],
    index=1 + list(your_data.ARCHITECTURES).index("resnet18")
    if "resnet18" in your_data.ARCHITECTURES
    else 0,
    key="yours_architecture",
    help="The torchvision architecture your state dict belongs to, or a torch.export program.",
)
input_size = size_col.selectbox(
    "Input size (pixels)",
    options=list(your_data.INPUT_SIZES),
    format_func=lambda v: "from torchvision's metadata (or the program)" if v is None else str(v),
    key="yours_input_size",
    disabled=architecture == _EXPORT,
    help="Images are resized to this square size and normalised with ImageNet's mean and std "
    "(torchvision's metadata for the architecture).",
)
weights = st.file_uploader(
    "Upload the weights (.pt, .pth) or the program (.pt2)",
    type=["pt", "pth", "pt2"],
    key="yours_weights",
    max_upload_size=your_data.widget_limit_mb(your_data.LIMITS.max_weights_bytes),
)
if weights is not None:
    is_export = architecture == _EXPORT
    marker = (weights.file_id, architecture, input_size)
    if st.session_state.get("state_yours_weights_done") != marker:
        st.session_state["state_yours_weights_done"] = marker
        try:
            with st.spinner("Checking and loading the network…"):
                your_data.add_network(
                    weights.getvalue(),
                    weights.name,
                    None if is_export else architecture,
                    None if is_export else input_size,
                )
        except InfluenceExplorerError as error:
            st.session_state["state_yours_weights_error"] = str(error)
        else:
            st.session_state.pop("state_yours_weights_error", None)
            st.rerun()
if st.session_state.get("state_yours_weights_error"):
    st.error(st.session_state["state_yours_weights_error"])

# ---------------------------------------------------------------- 3. the models
st.header("3. The models")
if dataset is None:
    st.caption("Upload a dataset first; the models are prepared for it here.")
    st.stop()
if uploaded_dataset_hash(settings.dataset) != dataset.content_hash:
    st.caption("The sidebar shows another dataset.")
    if st.button("Use your dataset", key="yours_use"):
        your_data.use_my_dataset()
        st.rerun()
    st.stop()
if settings.network is None:
    st.caption("Without a network the paper's two models are prepared; upload one for the third.")
link = "?" + "&".join(f"{k}={v}" for k, v in your_data.link_query(settings).items())
st.markdown("**Link to this dataset** (keep it to come back; anyone with it can open the data):")
st.code(f"{getattr(st.context, 'url', '') or ''}{link}", language=None)
explainer = engines.require_explainer(settings)
rows = []
for summary in facts.summaries(explainer).values():
    head = summary.original_head
    rows.append(
        {
            "model": summary.label,
            "input": summary.features,
            "test accuracy": f"{summary.test_accuracy:.3f}",
            "agrees with your head": "—" if head is None else f"{head.agreement:.3f}",
        }
    )
# A static table: the browser (and a reader) sees every cell; the list is three rows long.
with st.container(key="yours_models"):
    st.table(rows)
if settings.network is not None:
    st.markdown(your_data.WHAT_IS_EXPLAINED)
st.page_link("app_pages/explain.py", label="Explain its test images or an upload", icon="➡️")
