"""Compare: the paper's figure — how each model's influence relates to pixel distance."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard.components.classes import label_makeup
from dashboard.components.figures import influence_vs_distance, plotly_config
from dashboard.components.images import upscale
from dashboard.services import engines, explanations, facts, links, query
from dashboard.services.explanations import SIGN_CONVENTION
from dashboard.services.settings import ESTIMATE_LABELS, current_settings

st.title("Compare the models")

settings = current_settings()
explainer = engines.require_explainer(settings)
chosen = query.current_query(explainer)
explanation = explanations.explain(explainer, chosen, settings)
labels = facts.model_labels(explainer)
short = facts.model_short_labels(explainer)

image_col, text_col = st.columns([1, 5])
image_col.image(upscale(chosen.image, 112), width=112)
with text_col:
    st.subheader(chosen.title)
    st.markdown(
        f"Every training image's influence on this prediction, against its Euclidean distance "
        f"to the image in pixel space. Scores: **{ESTIMATE_LABELS[settings.estimate]}** "
        "estimate. " + SIGN_CONVENTION
    )
    st.page_link("app_pages/explain.py", label="Choose another image on Explain", icon="↩")

figure = influence_vs_distance(
    [
        (label, explanation.models[key].scores, explanation.models[key].pixel_distances)
        for key, label in labels.items()
    ],
    labels=facts.train_labels(explainer),
    class_names=facts.class_names(explainer),
    ids=facts.train_ids(explainer),
    highlighted={
        label: [
            item.train_index
            for item in (*explanation.models[key].helpful, *explanation.models[key].harmful)
        ]
        for key, label in labels.items()
    },
)
st.plotly_chart(
    figure,
    key="compare_scatter",
    config=plotly_config(f"compare-{chosen.key.replace(':', '-')[:20]}"),
)
st.caption(
    "How to read it. In Koh & Liang's Figure 2, the RBF SVM's influential images are the ones "
    "closest in pixel space (its kernel only sees pixel similarity), mostly of the test image's own "
    "class; the logistic regression on ImageNet features draws influence from images far away in "
    "pixels, including other classes, because it compares learned features. Points ringed in "
    "black are the top-k lists shown on Explain."
)

comparison = explanations.compare(explanation, explainer)
with st.container(key="compare_pairs"):
    for pair in comparison.pairs:
        if len(comparison.pairs) > 1:
            st.markdown(f"**{labels[pair.first]}** and **{labels[pair.second]}**")
        a, b, c = st.columns(3)
        a.metric(
            "Spearman between the models' scores",
            f"{pair.spearman:.2f}",
            help="Rank correlation over every training image. Near 0: the models rely on "
            "different training images; near 1: on the same ones in the same order.",
        )
        b.metric(
            "Shared most-helpful images",
            f"{pair.shared_helpful} of {settings.k}",
            help="How many training images are in both models' top-k helpful lists.",
        )
        c.metric(
            "Shared most-harmful images",
            f"{pair.shared_harmful} of {settings.k}",
            help="How many training images are in both models' top-k harmful lists.",
        )

st.subheader("Label make-up of the top-k lists")
rows = [
    {"model": labels[key], "list": f"most {kind}", **getattr(makeup, kind)}
    for key, makeup in comparison.label_makeup.items()
    for kind in ("helpful", "harmful")
]
with st.container(key="compare_makeup_figure"):
    st.plotly_chart(
        label_makeup(
            [
                (f"{short[key]} · most {kind}", getattr(makeup, kind))
                for key, makeup in comparison.label_makeup.items()
                for kind in ("helpful", "harmful")
            ],
            facts.class_names(explainer),
        ),
        key="compare_makeup_chart",
        config=plotly_config(f"label-makeup-{chosen.key.replace(':', '-')[:20]}"),
    )
st.dataframe(pd.DataFrame(rows), hide_index=True, key="compare_makeup")
st.caption(
    f"Counts of each training label among the top {settings.k}, one colour per class as in the "
    "scatter above. Explained label per model: "
    + "; ".join(
        f"{label}: {explanation.models[key].explained_label_name}" for key, label in labels.items()
    )
    + ". A model whose helpful images all share the explained label is reasoning by similarity to "
    "that class; helpful images of other classes mean it uses features the classes share, and "
    "harmful ones show which classes pull the prediction away."
)
links.publish(settings, explainer)
