"""Method: the math in brief, the sign convention, the two models, their accuracy, the limits."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard.services import engines, facts, links, your_data
from dashboard.services.explanations import SIGN_CONVENTION
from dashboard.services.settings import current_settings

st.title("Method")

st.header("What a score means")
st.markdown(
    "Both models minimise a regularised average loss over the n training images. Removing "
    "training image $z_j$ drops its term (the $1/n$ and $\\lambda$ stay, as in Koh & Liang):"
)
st.latex(
    r"R(\theta) = \frac{1}{n}\sum_{i=1}^{n} \ell(z_i, \theta) + \frac{\lambda}{2}\lVert\theta\rVert^2,"
    r"\qquad \hat\theta_{-j} = \arg\min_\theta\; R(\theta) - \tfrac{1}{n}\,\ell(z_j, \theta)."
)
st.markdown("The score of training image $z_j$ for a test image is")
st.latex(
    r"\mathcal{I}(z_j, z_{\text{test}}) = \tfrac{1}{n}\,"
    r"\nabla_\theta \ell(z_{\text{test}}, \hat\theta)^{\top} H^{-1}\, \nabla_\theta \ell(z_j, \hat\theta)"
    r"\;\approx\; \ell(z_{\text{test}}, \hat\theta_{-j}) - \ell(z_{\text{test}}, \hat\theta),"
    r"\qquad H = \nabla^2_\theta R(\hat\theta)."
)
st.info(
    SIGN_CONVENTION + " Because the score is in units of test loss, it can be checked "
    "directly against retraining on the Verify page (slope ≈ 1, not only correlation)."
)

st.header("Two estimates of the same quantity")
st.markdown(
    "- **First order** (Koh & Liang, 2017) uses $H$, the Hessian *with* $z_j$. It systematically "
    "under-estimates the change for high-leverage images.\n"
    "- **Newton-corrected** (the default) uses $H_{-j} = H - \\tfrac{1}{n}\\nabla^2\\ell(z_j)$, one "
    "exact Newton step on the objective without $z_j$, via a low-rank Sherman–Morrison update. "
    "For these binary models it is the first-order score divided by $1 - h_j$:"
)
st.latex(
    r"\mathcal{I}_{\text{corrected}}(z_j) = \frac{\mathcal{I}_{\text{first order}}(z_j)}{1 - h_j},"
    r"\qquad h_j = \tfrac{1}{n}\, c_j\, x_j^{\top} H^{-1} x_j \;\;\text{(leverage)}."
)
st.markdown("Every view says which estimate it shows; the sidebar switches between them.")

st.header("The two models")
st.markdown(
    "- **RBF SVM on pixels** — the paper's kernel model: $K = \\mathrm{rbf}(X, X)$ on pixels "
    "scaled to $[-1, 1]$, factorised $K = LL^\\top$, and a linear model on the rows of $L$ "
    "trained with the smooth hinge $\\ell_t(s) = t \\log(1 + e^{(1 - s)/t})$. It can only compare "
    "images pixel by pixel.\n"
    "- **Logistic regression on ImageNet features** — only the top layer is trained, on frozen "
    "features of a pretrained network (the paper used Inception v3; offline here, "
    "EfficientNet-Lite0). It compares what the network recognises, not pixels.\n\n"
    "Both are convex and fitted to convergence in float64, so the Hessian is exact and the "
    "influence function's assumptions hold; retraining for ground truth uses the same objective "
    "and solver, warm-started."
)

st.header("Your network's last layer (the third model)")
st.markdown(
    "With a network uploaded on **Your data**, a third model joins these two: a logistic "
    "regression (softmax for more than two classes) on your network's penultimate features — "
    "the input of its final linear layer — started from your network's own head and refitted to "
    "convergence in float64, with λ chosen by the same cross-validation. **Your network's lower "
    "layers are frozen**, as Koh & Liang froze Inception v3: the features do not change when a "
    "training image is removed, so the scores describe the refitted last layer, and they are "
    "checked against retraining that layer exactly like the other models' scores."
)
st.info(
    your_data.WHAT_IS_EXPLAINED.replace(
        "What these scores explain.", "**What these scores explain.**"
    )
)
st.page_link(
    "app_pages/trust.py",
    label="How far influence through a whole network is from this: the Trust page",
    icon="🔎",
)

explainer = engines.explainer_if_ready()
if explainer is None:
    st.caption("Accuracies appear here once the models for the current settings are prepared.")
else:
    st.subheader(f"On {facts.dataset_name(explainer)}")
    rows = []
    for summary in facts.summaries(explainer).values():
        rows.append(
            {
                "model": summary.label,
                "input": summary.features,
                "train accuracy": f"{summary.train_accuracy:.3f}",
                "test accuracy": f"{summary.test_accuracy:.3f}",
                "hyperparameters": ", ".join(
                    f"{name} = {value:.3g}" for name, value in summary.hyperparameters.items()
                ),
                "fit (s)": f"{summary.fit_seconds:.2f}",
            }
        )
    # A static table: long headers and values wrap instead of being cut to a column's width.
    with st.container(key="method_summaries"):
        st.table(pd.DataFrame(rows).set_index("model"))
    st.caption(
        "The logistic regression's λ is chosen by 3-fold cross-validated accuracy, never by how "
        "good influence looks; n = "
        f"{facts.n_train(explainer)} training and {facts.n_test(explainer)} test images."
    )

st.header("Limits: when not to trust a score")
st.markdown(
    "- **Convex models only, here.** For deep networks trained by SGD the loss is not convex, "
    "$\\hat\\theta$ is not a minimum, and influence estimates degrade with depth, width and "
    "weight decay (Basu, Pope & Feizi, 2021). These two models avoid that by construction.\n"
    "- **Leave-one-out, locally.** A score predicts removing *one* image. Removing many at once "
    "(groups) adds up only approximately (Koh, Ang, Teo & Liang, 2019).\n"
    "- **Tiny scores are noise-level.** Many training images barely matter; their order is not "
    "meaningful. Trust the top of the lists, and verify it.\n"
    "- **Iterative solvers and damping change the answer.** CG and LiSSA approximate $H^{-1}$; "
    "damping adds to $H$ and biases scores towards zero. The exact solver with no damping is the "
    "reference.\n"
    "- **The SVM's smooth hinge is sharp.** At a small temperature $t$ its Hessian is dominated by "
    "points on the margin, and first-order estimates can be far off for them (slopes in the "
    "thousands were seen at $t = 0.001$); the default $t = 0.01$ was chosen by measurement.\n"
    "- **Uploads are explained for each model's own prediction**, since they have no true label; "
    "an image unlike the training data gets an explanation, but not necessarily a meaningful one.\n"
    "- **Check it:** the Verify page retrains and reports Pearson, Spearman and slope."
)

links.publish(current_settings(), explainer)
