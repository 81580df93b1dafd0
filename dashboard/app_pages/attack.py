"""Attack: change a few helpful training images slightly, retrain, and see if the prediction flips."""

from __future__ import annotations

import streamlit as st

from dashboard.components.figures import loss_history
from dashboard.components.images import upscale
from dashboard.components.runs import remembered_or_run
from dashboard.services import InfluenceExplorerError, engines, facts, query
from dashboard.services import experiments as ex
from dashboard.services.settings import current_settings
from dashboard.services.widgets import forget_out_of_range, forget_unless_among, initial_value

IMAGE_PX = 168

st.title("Training-set attack")
st.markdown(
    "Koh & Liang (2017, §5.2): take the training images that helped a test prediction most and "
    "change their pixels a little, in the direction that influence says raises that prediction's "
    "loss (I_pert,loss), retraining the model after every step. If the prediction flips, a few "
    "barely visible changes to the training data were enough to change what the model says."
)

settings = current_settings()
explainer = engines.require_explainer(settings)
labels = facts.model_labels(explainer)
names = facts.class_names(explainer)
n_test = facts.n_test(explainer)
defaults = ex.ATTACK_DEFAULTS

forget_unless_among("attack_model", list(labels))
initial_value("attack_model", facts.default_model(explainer))
initial_value("attack_budget", defaults.budget)
initial_value("attack_step_size", defaults.step_size)
initial_value("attack_steps", defaults.steps)
initial_value("attack_n_perturb", defaults.n_perturb)
initial_value("attack_retrain", defaults.retrain_every_step)
forget_out_of_range("attack_test_index", 0, n_test - 1)

image_col, settings_col = st.columns([1, 2], gap="large")
with image_col:
    model_key = st.radio("Model", options=list(labels), format_func=labels.get, key="attack_model")
    test_index = int(
        st.number_input(
            "Test image #",
            min_value=0,
            max_value=n_test - 1,
            value=query.selected_test_index(explainer),
            step=1,
            key="attack_test_index",
            help="Defaults to the test image picked on Explain.",
        )
    )
    if query.current_query(explainer).upload is not None:
        st.caption(
            "Explain is showing your upload. This page retrains against a labelled test image, "
            "so it uses one of the test images."
        )
    prediction = facts.test_prediction(explainer, model_key, test_index)
    true_name = facts.test_label_name(explainer, test_index)
    st.image(upscale(facts.test_image(explainer, test_index), 112), width=112)
    st.caption(
        f"True label **{true_name}**; the {labels[model_key]} predicts "
        f"**{prediction.label_name}** (p = {prediction.probability:.2f}). The attack raises the "
        "loss of the predicted label."
    )
    if prediction.label_name != true_name:
        suggestions = ex.attack_suggestions(explainer, settings)
        st.caption(
            "This prediction is wrong, so a flip would make it right. Koh & Liang attack images "
            "the models get right"
            + (
                ", e.g. test images " + ", ".join(f"#{i}" for i in suggestions) + "."
                if suggestions
                else "."
            )
        )

with settings_col:
    budget_col, step_col = st.columns(2)
    budget = budget_col.number_input(
        "Budget ε (pixel units, 0–255)",
        min_value=1,
        max_value=255,
        step=1,
        key="attack_budget",
        help="No pixel of a perturbed image moves more than this many intensity levels.",
    )
    step_size = step_col.number_input(
        "Step size (pixel units)",
        min_value=1,
        max_value=64,
        step=1,
        key="attack_step_size",
    )
    steps_col, images_col = st.columns(2)
    steps = steps_col.number_input(
        "Steps at most",
        min_value=1,
        max_value=50,
        step=1,
        key="attack_steps",
        help="The attack stops as soon as the prediction flips.",
    )
    n_perturb = images_col.number_input(
        "Training images to perturb",
        min_value=1,
        max_value=10,
        step=1,
        key="attack_n_perturb",
        help="The test image's most helpful training images, most helpful first.",
    )
    retrain = st.checkbox(
        "Retrain after every step (Koh & Liang)",
        key="attack_retrain",
        help="Otherwise follow the original model's gradient and retrain once at the end: "
        "cheaper, and weaker.",
    )
    st.caption(
        f"The budget is in **pixel units**: every pixel of a perturbed image stays within ε of "
        "the original and inside 0–255, so it is still a valid 8-bit image of the dataset's type. "
        f"Up to {int(steps) if retrain else 1} retrain(s) of the {labels[model_key]} "
        "(one to a few seconds each on the demo)."
    )

config = None
try:
    config = ex.attack_config(
        int(budget), int(step_size), int(steps), int(n_perturb), bool(retrain)
    )
except InfluenceExplorerError as exc:
    st.error(str(exc))

result = remembered_or_run(
    ex.ATTACK_RUNS,
    None if config is None else ex.AttackRun(settings.engine, model_key, test_index, config),
    explainer,
    key="attack_run",
    label="Attack",
    running="Attacking…",
    idle="Press the button to attack.",
    settings=settings,
)

before = names[result.predicted_before]
after = names[result.predicted_after]
p_before = float(result.probabilities_before[result.predicted_before])
p_after_same = float(result.probabilities_after[result.predicted_before])
with st.container(key="attack_outcome"):
    if result.flipped:
        st.success(
            f"**Flipped.** Retrained on the perturbed image(s), the {labels[model_key]} now "
            f"predicts **{after}** (p = {float(result.probabilities_after[result.predicted_after]):.2f}) "
            f"instead of **{before}** (p = {p_before:.2f}), after {result.steps_taken} step(s)."
        )
    else:
        st.warning(
            f"**Not flipped** within {result.steps_taken} step(s): still **{before}**, its "
            f"probability {p_before:.2f} → {p_after_same:.2f}."
        )
    a, b, c, d = st.columns(4)
    a.metric("Before", before, f"p = {p_before:.2f}", delta_color="off", delta_arrow="off")
    b.metric(
        "After retraining",
        after,
        f"p({before}) = {p_after_same:.2f}",
        delta_color="off",
        delta_arrow="off",
    )
    c.metric("Largest pixel change", f"{result.max_change} of {result.budget}")
    d.metric("Time", f"{result.seconds:.1f} s")

attacked = ex.amplified_difference(result)
for position, train_index in enumerate(result.train_indices):
    label = facts.train_label_name(explainer, train_index)
    st.markdown(f"**Training image #{int(train_index)}** ({label})")
    original_col, perturbed_col, difference_col = st.columns(3)
    original_col.image(
        upscale(result.original_images[position], IMAGE_PX), caption="Original", width=IMAGE_PX
    )
    perturbed_col.image(
        upscale(result.perturbed_images[position], IMAGE_PX),
        caption="Perturbed (what the model was retrained on)",
        width=IMAGE_PX,
    )
    difference_col.image(
        upscale(attacked[position], IMAGE_PX),
        caption=f"Difference, amplified: grey = unchanged, black/white = −/+{result.budget}",
        width=IMAGE_PX,
    )

st.subheader("Test loss during the attack", anchor=False)
st.plotly_chart(
    loss_history(result.loss_history, label=before),
    key="attack_loss",
    config={"displaylogo": False},
)
st.caption(
    f"Loss of {before!r} for test image #{test_index} after each step's retraining (step 0: "
    "the original model); the prediction flips once another label becomes the more likely. "
    f"Retraining: {result.retraining}."
)
