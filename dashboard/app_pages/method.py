"""Method: the math in brief, the three estimates (exact in the margin first), the models for any
number of classes, their accuracy, how λ was chosen (the curve), and the limits."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard.components.classes import lambda_curve
from dashboard.components.figures import plotly_config
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
st.markdown(
    "A score estimates the leave-one-out change of the test image's loss, "
    "$\\ell(z_{\\text{test}}, \\hat\\theta_{-j}) - \\ell(z_{\\text{test}}, \\hat\\theta)$."
)
st.info(
    SIGN_CONVENTION + " Because the score is in units of test loss, it can be checked "
    "directly against retraining on the Verify page (slope ≈ 1, not only correlation)."
)

st.header("Three estimates of the same change")
st.markdown(
    "Both models are linear in their parameters: the outputs are $s(z) = W^\\top\\phi(z)$ (one "
    "margin for two classes, one score per class for more) and the loss depends on $\\theta$ "
    "only through them. All three estimates predict the parameter change of removing $z_j$ "
    "the same way, one exact Newton step on the objective without it, with "
    "$H_{-j} = H - \\tfrac{1}{n}\\nabla^2\\ell(z_j)$ the Hessian without the point (a low-rank "
    "Woodbury update: a $C \\times C$ solve per training image, never a $p \\times p$ matrix):"
)
st.latex(
    r"\Delta\theta_j = \tfrac{1}{n}\, H_{-j}^{-1}\nabla_\theta\ell(z_j, \hat\theta),\qquad"
    r"\Delta s_j = (\phi_{\text{test}} \otimes I_C)^{\top}\Delta\theta_j"
    r"\quad\text{(exact: } s \text{ is linear in } \theta\text{)}."
)
st.markdown("They differ in how they turn the output change into a loss change:")
st.markdown(
    "- **Exact in the margin** (the default) evaluates the test loss at the predicted outputs:"
)
st.latex(
    r"\mathcal{I}_{\text{margin}}(z_j) = L(s_{\text{test}} + \Delta s_j,\, y) - L(s_{\text{test}},\, y)."
)
st.markdown(
    "- **Newton-corrected** takes the loss's tangent there, "
    "$\\nabla_s L^{\\top}\\Delta s_j = \\tfrac{1}{n}\\nabla\\ell_{\\text{test}}^{\\top}"
    "H_{-j}^{-1}\\nabla\\ell_j$; for two classes it is the first-order score divided by "
    "$1 - h_j$, $h_j$ the image's leverage.\n"
    "- **First order** (Koh & Liang, 2017) is the tangent with $H$, the Hessian *with* $z_j$: "
    "$\\tfrac{1}{n}\\nabla\\ell_{\\text{test}}^{\\top}H^{-1}\\nabla\\ell_j$. It "
    "under-estimates the change for high-leverage images."
)
with st.container(key="method_margin"):
    st.subheader("Why exact in the margin is the default", anchor=False)
    st.markdown(
        "The loss is convex in the outputs, so the tangent never exceeds the exact change: "
        "$L(s + \\Delta) - L(s) - \\nabla L^{\\top}\\Delta = \\tfrac{1}{2}\\Delta^{\\top}"
        "\\nabla^2 L(\\xi)\\Delta \\ge 0$. The tangent is accurate only while the output change is "
        "small next to the scale on which the loss curves. The SVM's smooth hinge, "
        "$t\\log(1 + e^{(1 - s)/t})$, is nearly exponential beyond the margin with scale $t$, "
        "and one training image moves a confidently classified image's margin by about $t$: "
        "there the loss changes by a factor $e^{-\\Delta s/t}$, not linearly. Evaluating the loss "
        "instead of its tangent adds no approximation to the Newton step and costs $C$ solves "
        "per test image. Measured against retraining (`python -m bench.verify_demo`, three "
        "class pairs, test images chosen by margin: confident, near the boundary, wrong; "
        "with the SVM's sharper earlier hinge, $t = 0.01$), it brought the SVM's confident "
        "images from slopes of 1.12–2.73 to 0.94–1.13, and elsewhere agrees with the "
        "Newton-corrected estimate (within 0.015 of its |slope − 1| or better on every image)."
    )
    st.markdown(
        "**Its limit.** It is exact only in the margin: $\\Delta\\theta_j$ is still one Newton "
        "step. Where that step is off (very high leverage, or a loss so sharp that other "
        "images' curvature changes as $\\theta$ moves), the error is passed on, enlarged by the "
        "loss's curvature (an error $\\varepsilon$ in $\\Delta s$ changes the loss by the factor "
        "$e^{\\varepsilon/t}$). Where the Newton step overshoots, the Newton-corrected "
        "estimate's two errors partly cancel and it can be closer: seen on the demo only with "
        "the logistic regression's λ forced down to 1e-4 (Pullover vs Coat, test image 6: slope "
        "0.78 against 1.14). Every view says which estimate it shows; the sidebar switches "
        "between them and Verify compares all three on the same retrained images."
    )

st.header("The two models, for any number of classes")
st.markdown(
    "- **RBF SVM on pixels**: the paper's kernel model, $K = \\mathrm{rbf}(X, X)$ on pixels "
    "scaled to $[-1, 1]$, factorised $K = LL^\\top$, and a linear model on the rows of $L$ "
    "(a Nyström approximation with up to 1,000 landmarks once the exact kernel would not fit "
    "in memory). For two classes it is trained with the smooth hinge "
    "$t\\log(1 + e^{(1 - s)/t})$; for $C \\ge 3$ with one score per class and the Crammer–Singer "
    "hinge smoothed the same way, $t\\log(1 + \\sum_{c \\ne y} e^{(1 + s_c - s_y)/t})$, whose "
    "two-class case is the paper's loss. Its probability is Platt-scaled. It compares images "
    "pixel by pixel.\n"
    "- **Logistic regression on ImageNet features**: only the top layer is trained (binary "
    "logistic for two classes, softmax for more), on frozen features of a pretrained network "
    "(the paper used Inception v3; offline here, EfficientNet-Lite0). It compares what the "
    "network recognises, not pixels.\n\n"
    "Both are convex and fitted to convergence in float64 by Newton's method, so the Hessian "
    "is exact and the influence function's assumptions hold; retraining for ground truth uses "
    "the same objective and solver, warm-started."
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
    st.caption(
        "Accuracies and the λ curve appear here once the models for the current settings are "
        "prepared."
    )
else:
    summaries = facts.summaries(explainer)
    st.subheader(f"On {facts.dataset_name(explainer)}")
    rows = []
    for summary in summaries.values():
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
        f"{len(facts.class_names(explainer))} classes; n = {facts.n_train(explainer):,} "
        f"training and {facts.n_test(explainer):,} test images."
    )

    curves = {key: s for key, s in summaries.items() if s.lambda_curve is not None}
    st.header("How λ was chosen")
    if not curves:
        st.caption("No model's λ was chosen by cross-validation in these settings.")
    for key, summary in curves.items():
        curve = summary.lambda_curve
        loss = curve.criterion == "log_loss"
        with st.container(key=f"method_lambda_{key}"):
            st.subheader(summary.label, anchor=False)
            st.markdown(
                f"{curve.rule} Never by how good influence looks. Each training image is held "
                f"out once per repeat; its held-out {'log-loss' if loss else 'accuracy'} is "
                "averaged over the repeats, then over the images (per image, not per fold, so "
                "unequal folds weigh nothing extra); the standard error is the spread of those "
                "per-image values over √n. **The one-standard-error rule**: every λ whose mean "
                "is within one standard error of the best is as good as the data can tell, and "
                "the largest of them (the most regularised, the steadiest) is chosen."
            )
            if curve.edge_note:
                st.info(curve.edge_note, icon="ℹ️")
            st.plotly_chart(
                lambda_curve(
                    curve.grid,
                    curve.mean,
                    curve.stderr,
                    best=curve.best,
                    chosen=curve.chosen,
                    criterion=f"held-out {'log-loss' if loss else 'accuracy'}",
                ),
                key=f"method_lambda_chart_{key}",
                config=plotly_config(f"lambda-curve-{key}"),
            )
            table = pd.DataFrame(
                {
                    "λ": [f"{v:g}" for v in curve.grid],
                    "mean held-out log-loss": [f"{v:.4f}" for v in curve.log_loss],
                    "standard error": [f"{v:.4f}" for v in curve.stderr],
                    "mean held-out accuracy": [f"{v:.4f}" for v in curve.accuracy],
                    "": [
                        " · ".join(
                            word
                            for word, hit in (
                                ("best", v == curve.best),
                                ("chosen", v == curve.chosen),
                            )
                            if hit
                        )
                        for v in curve.grid
                    ],
                }
            )
            st.table(table.set_index("λ"))
            if curve.best != curve.chosen:
                st.caption(
                    f"λ = {curve.best:g} had the best mean, but λ = {curve.chosen:g} is within "
                    "one standard error of it and regularises more, so it was chosen."
                )

st.header("Limits: when not to trust a score")
st.markdown(
    "- **Convex models only, here.** For deep networks trained by SGD the loss is not convex, "
    "$\\hat\\theta$ is not a minimum, and influence estimates degrade with depth, width and "
    "weight decay (Basu, Pope & Feizi, 2021); the Trust page measures it. These two models "
    "avoid that by construction.\n"
    "- **Leave-one-out, locally.** A score predicts removing *one* image. Removing many at once "
    "(groups) adds up only approximately (Koh, Ang, Teo & Liang, 2019).\n"
    "- **Tiny scores are noise-level.** Many training images barely matter; their order is not "
    "meaningful. Trust the top of the lists, and verify it.\n"
    "- **Iterative solvers and damping change the answer.** CG and LiSSA approximate $H^{-1}$; "
    "damping adds to $H$ and biases scores towards zero. The exact solver with no damping is the "
    "reference.\n"
    "- **The SVM's smooth hinge can be sharp.** At a small temperature $t$ its Hessian is "
    "dominated by images on the margin and the loss curves quickly beyond it; the linearised "
    "estimates were far off there (slopes in the thousands at $t = 0.001$, up to 2.7 at "
    "$t = 0.01$). The default $t = 0.1$ was chosen by measurement against retraining "
    "(`python -m bench.svm_defaults`), and the exact-in-the-margin estimate handles the rest.\n"
    "- **Uploads are explained for each model's own prediction**, since they have no true label; "
    "an image unlike the training data gets an explanation, but not necessarily a meaningful one.\n"
    "- **Check it:** the Verify page retrains and reports Pearson, Spearman and the slope "
    "through the origin."
)

links.publish(current_settings(), explainer)
