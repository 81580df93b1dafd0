"""Attack: change a few helpful training images slightly, retrain, and see if the prediction flips."""

from __future__ import annotations

import streamlit as st

from dashboard.components.figures import loss_history, plotly_config
from dashboard.components.images import upscale
from dashboard.components.runs import remembered_or_run, retraining_test_image
from dashboard.services import (
    InfluenceExplorerError,
    engines,
    facts,
    links,
    measured,
    query,
)
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
explainer = engines.require_explainer(settings, in_process=True)
labels = facts.model_labels(explainer)
names = facts.class_names(explainer)
n_test = facts.n_test(explainer)
defaults = ex.ATTACK_DEFAULTS

forget_unless_among("attack_model", list(labels), what="model")
initial_value("attack_model", facts.default_model(explainer))
initial_value("attack_budget", defaults.budget)
initial_value("attack_step_size", defaults.step_size)
initial_value("attack_steps", defaults.steps)
initial_value("attack_n_perturb", defaults.n_perturb)
initial_value("attack_retrain", defaults.retrain_every_step)
forget_out_of_range("attack_test_index", 0, n_test - 1, what="test image")


def _use_image(index: int) -> None:
    st.session_state["attack_test_index"] = int(index)
    st.session_state["state_attack_auto"] = None


image_col, settings_col = st.columns([1, 2], gap="large")
with image_col:
    model_key = st.radio("Model", options=list(labels), format_func=labels.get, key="attack_model")
    start = ex.attack_start(explainer, settings, model_key)
    # The first image: the one picked on Explain, else the model's least confident correct one
    # (where an attack can succeed), following the model while the user has not chosen another.
    auto = st.session_state.get("state_attack_auto")
    if "attack_test_index" not in st.session_state or (
        auto is not None and st.session_state["attack_test_index"] == auto
    ):
        chosen_first = (
            query.selected_test_index(explainer)
            if query.has_chosen_test_image()
            else (start.first if start.first is not None else 0)
        )
        st.session_state["attack_test_index"] = chosen_first
        st.session_state["state_attack_auto"] = (
            None if query.has_chosen_test_image() else chosen_first
        )
    test_index = int(
        st.number_input(
            "Test image #",
            min_value=0,
            max_value=n_test - 1,
            step=1,
            key="attack_test_index",
            on_change=lambda: st.session_state.update(state_attack_auto=None),
            help="Starts from the test image picked on Explain, else from the model's least "
            "confident correctly classified test image (where an attack can succeed).",
        )
    )
    prediction, true_name = retraining_test_image(
        explainer,
        model_key,
        test_index,
        labels[model_key],
        "The attack raises the loss of the predicted label.",
    )
    if prediction.label_name != true_name:
        st.caption(
            "This prediction is wrong, so a flip would make it right. Koh & Liang attack images "
            "the models get right."
        )
    if start.suggestions:
        st.caption("This model's least confident correct test images (most likely to flip):")
        with st.container(horizontal=True, gap="small", key="attack_suggestions"):
            for index in start.suggestions:
                st.button(
                    f"#{index}",
                    key=f"attack_use_{index}",
                    on_click=_use_image,
                    args=(index,),
                    type="primary" if index == test_index else "secondary",
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
    figures = measured.attack_defaults_measured(explainer, settings)
    if figures:
        with st.container(key="attack_measured"):
            st.caption(
                "**How often the defaults flip a prediction:** "
                + "; ".join(f"{f.label}: {f.text}" for f in figures)
                + ", over each model's 10 least confident correct test images "
                + (
                    ""
                    if figures[0].same_settings
                    else "(measured on the bundled demo's default "
                    "pair and backbone, not the settings chosen here) "
                )
                + f"— measured by `{measured.ATTACK_MEASURE_COMMAND}`."
            )

config = None
try:
    config = ex.attack_config(
        int(budget), int(step_size), int(steps), int(n_perturb), bool(retrain)
    )
except InfluenceExplorerError as exc:
    st.error(str(exc))

links.publish(settings, explainer)
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
    config=plotly_config(f"attack-loss-test-{test_index}"),
)
st.caption(
    f"Loss of {before!r} for test image #{test_index} after each step's retraining (step 0: "
    "the original model); the prediction flips once another label becomes the more likely. "
    f"Retraining: {result.retraining}."
)
