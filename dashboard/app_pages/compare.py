"""Compare: the paper's figure — how each model's influence relates to pixel distance."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard import state
from dashboard.components.figures import influence_vs_distance
from dashboard.components.images import upscale

st.title("Compare the two models")

settings = state.current_settings()
explainer = state.require_explainer(settings)
query = state.current_query(explainer)
explanation = state.explain(explainer, query, settings)
names = state.class_names(explainer.dataset)
labels = state.model_labels(explainer)

image_col, text_col = st.columns([1, 5])
image_col.image(upscale(query.image, 112), width=112)
with text_col:
    st.subheader(query.title)
    st.markdown(
        f"Every training image's influence on this prediction, against its Euclidean distance "
        f"to the image in pixel space. Scores: **{state.ESTIMATE_LABELS[settings.estimate]}** "
        "estimate. " + state.SIGN_CONVENTION
    )
    st.page_link("app_pages/explain.py", label="Choose another image on Explain", icon="↩")

figure = influence_vs_distance(
    [
        (labels[key], explanation.models[key].scores, explanation.models[key].pixel_distances)
        for key in ("svm", "logreg")
    ],
    labels=state.train_labels(explainer),
    class_names=names,
    ids=state.train_ids(explainer),
    highlighted={
        labels[key]: [
            item.train_index
            for item in (*explanation.models[key].helpful, *explanation.models[key].harmful)
        ]
        for key in ("svm", "logreg")
    },
)
st.plotly_chart(figure, key="compare_scatter", config={"displaylogo": False})
st.caption(
    "How to read it. In Koh & Liang's Figure 2, the RBF SVM's influential images are the ones "
    "closest in pixel space (its kernel only sees pixel similarity), mostly of the test image's own "
    "class; the logistic regression on ImageNet features draws influence from images far away in "
    "pixels, including the other class, because it compares learned features. Points ringed in "
    "black are the top-k lists shown on Explain."
)

comparison = state.compare(explanation, names)
a, b, c = st.columns(3)
a.metric(
    "Spearman between the models' scores",
    f"{comparison.spearman:.2f}",
    help="Rank correlation over every training image. Near 0: the models rely on different "
    "training images; near 1: on the same ones in the same order.",
)
b.metric(
    "Shared most-helpful images",
    f"{comparison.overlap_helpful} of {settings.k}",
    help="How many training images are in both models' top-k helpful lists.",
)
c.metric(
    "Shared most-harmful images",
    f"{comparison.overlap_harmful} of {settings.k}",
    help="How many training images are in both models' top-k harmful lists.",
)

st.subheader("Label make-up of the top-k lists")
rows = []
for key in ("svm", "logreg"):
    for kind in ("helpful", "harmful"):
        counts = comparison.label_makeup[key][kind]
        rows.append({"model": labels[key], "list": f"most {kind}", **counts})
st.dataframe(pd.DataFrame(rows), hide_index=True, key="compare_makeup")
st.caption(
    f"Counts of each training label among the top {settings.k}. Explained label per model: "
    + "; ".join(
        f"{labels[key]}: {explanation.models[key].explained_label_name}"
        for key in ("svm", "logreg")
    )
    + ". A model whose helpful images all share the explained label is reasoning by similarity to "
    "that class; helpful images of the other class mean it uses features the classes share."
)
