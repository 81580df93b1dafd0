"""The Explain page's own figures: how often a model's scores are negligible, how often an image is
unlike the training data, and how long the "check this image now" action takes.

Usage: ``python -m bench.explain_checks [--checks 10] [--seed 0]``

On the bundled demo (default pair and backbone):

- for every test image and model, the largest |score| (Newton-corrected) against the rule in
  ``core.report`` (negligible below ``NEGLIGIBLE_LOSS_CHANGE`` = 1e-6, in loss units), and how many
  images fall below 1e-5 and 1e-6;
- how many test images and the two bundled photos (tests/assets/photos) each model flags as unlike
  its training data (``core.ood``; a held-out test image is flagged only if it lies farther than
  every test image, i.e. never, by construction: listed as a check);
- the quick check (``Explainer.verify(k=10)``, every model) on N random test images: wall time.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from bench.common import markdown_table, write_results
from core.commands.common import StageBars
from core.data import load_demo
from core.explainer import Explainer
from core.images import load_image_file
from core.report import NEGLIGIBLE_LOSS_CHANGE, score_scale

PHOTOS = Path(__file__).resolve().parent.parent / "tests" / "assets" / "photos"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checks", type=int, default=10, help="test images quick-checked")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    explainer = Explainer(load_demo()).prepare(StageBars(True))
    labels = {key: fitted.label for key, fitted in explainer.models.items()}
    largest: dict[str, list[float]] = {key: [] for key in labels}
    flagged: dict[str, int] = dict.fromkeys(labels, 0)
    start = time.perf_counter()
    for index in range(explainer.n_test):
        explanation = explainer.explain(test_index=index, k=1)
        for key, model in explanation.models.items():
            largest[key].append(score_scale(model.scores, model.loss).largest)
            flagged[key] += int(model.familiarity.unusual)
    explain_seconds = time.perf_counter() - start

    rows = []
    for key, label in labels.items():
        values = np.array(largest[key])
        rows.append(
            [
                label,
                f"{int(np.sum(values < NEGLIGIBLE_LOSS_CHANGE))} of {len(values)}",
                f"{int(np.sum(values < 1e-5))} of {len(values)}",
                f"{np.median(values):.2g} [{values.min():.2g}, {values.max():.2g}]",
                f"{flagged[key]} of {len(values)}",
            ]
        )

    photo_rows = []
    for path in sorted(PHOTOS.glob("*.jpg")):
        image = load_image_file(
            path,
            target_shape=explainer.dataset.image_shape,
            light_on_dark=explainer.dataset.light_on_dark,
        ).image
        explanation = explainer.explain(image=image, k=1)
        photo_rows.append(
            [path.name]
            + [
                f"{'unlike' if m.familiarity.unusual else 'within'} "
                f"(ratio {m.familiarity.ratio:.2f})"
                for m in explanation.models.values()
            ]
        )

    chosen = np.sort(
        np.random.default_rng(args.seed).choice(explainer.n_test, args.checks, replace=False)
    )
    seconds = []
    for index in chosen:
        start = time.perf_counter()
        explainer.verify(test_index=int(index), k=10)
        seconds.append(time.perf_counter() - start)
    seconds_array = np.array(seconds)

    body = (
        f"{explainer.dataset.name}, {explainer.n_test} test images; scores Newton-corrected. "
        f"Explaining all of them took {explain_seconds:.0f} s.\n\n"
        "Largest |score| per test image and model, and the out-of-distribution check:\n\n"
        + markdown_table(
            [
                "model",
                f"negligible (every score below {NEGLIGIBLE_LOSS_CHANGE:g})",
                "every score below 1e-5",
                "largest |score|: median [min, max]",
                "test images flagged as unlike the training data",
            ],
            rows,
        )
        + "\n\nThe bundled photos (tests/assets/photos), against each model's training data "
        "(distance to the 10th nearest training image ÷ the largest among held-out test "
        "images):\n\n"
        + markdown_table(["photo", *labels.values()], photo_rows)
        + f"\n\nThe quick check (retrain every model without each of the top 10 by |score|) on "
        f"{len(chosen)} random test images (seed {args.seed}: "
        f"{', '.join(str(int(i)) for i in chosen)}): median {np.median(seconds_array):.1f} s, "
        f"range {seconds_array.min():.1f}–{seconds_array.max():.1f} s.\n"
    )
    print(write_results("explain_checks", "The Explain page's checks on the demo", body))


if __name__ == "__main__":
    main()
