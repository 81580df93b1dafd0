"""Fragility lab: configuration checks, a tiny grid end to end (table, damping, ground truth, the
noise floor), one tiny cell of LeNet-5 and of the ResNet end to end, the results file, resuming a
stopped grid from its progress file, and the views the Trust page builds on."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from core.errors import InfluenceExplorerError
from core.fragility import (
    FORMAT_VERSION,
    STUDY_NUMBERS,
    STUDY_SOLVER,
    FragilityConfig,
    GroundTruthConfig,
    Setting,
    SolverSettings,
    TrainingConfig,
    bundled_results_path,
    correlation_series,
    load_results,
    noise_floor,
    progress_path,
    results_from_dict,
    results_from_progress,
    results_to_dict,
    run_fragility,
    run_setting,
    save_results,
    solver_comparison,
    study_comparison,
)
from core.fragility import running as running_module
from core.influence import SolverConfig
from core.networks import Architecture, torch_threads


@pytest.fixture(autouse=True)
def one_torch_thread_and_a_fixed_seed():
    """These networks are tiny: OpenMP threads cost far more than they bring (as in the CLI)."""
    with torch_threads(1), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        yield


def test_configs_check_their_fields():
    with pytest.raises(InfluenceExplorerError, match="depth"):
        Architecture(0, 4)
    with pytest.raises(InfluenceExplorerError, match="activation"):
        Architecture(1, 4, "sigmoid")
    with pytest.raises(InfluenceExplorerError, match="6k"):
        Architecture.resnet(9, 4)
    with pytest.raises(InfluenceExplorerError, match="family"):
        Architecture(2, 4, family="vgg")
    with pytest.raises(InfluenceExplorerError, match="solvers"):
        SolverSettings(solvers=("newton",))
    with pytest.raises(InfluenceExplorerError, match="damping_margin"):
        SolverSettings(solver=SolverConfig())
    with pytest.raises(InfluenceExplorerError, match="retrain_fraction"):
        GroundTruthConfig(retrain_fraction=0.0)
    with pytest.raises(InfluenceExplorerError, match="noise_seeds"):
        GroundTruthConfig(noise_seeds=-1)
    with pytest.raises(InfluenceExplorerError, match="weight_decays"):
        FragilityConfig(weight_decays=(-1.0,))
    with pytest.raises(InfluenceExplorerError, match="repeats"):
        FragilityConfig(repeats=0)
    with pytest.raises(InfluenceExplorerError, match="architecture"):
        Setting("cnn", 1e-3)
    with pytest.raises(InfluenceExplorerError, match="family"):
        Setting("cnn", 1e-3, Architecture.lenet5())
    assert Setting.network(Architecture.lenet5(), 0).model == "lenet"
    assert hash(FragilityConfig.quick()) == hash(FragilityConfig.quick())  # a cache key


def test_the_study_holds_one_solver_config_and_only_its_own_choices():
    """SolverSettings does not copy SolverConfig's fields: it holds one, and each solver's
    configuration is that one with the method, the measured damping and the seed."""
    own = {f.name for f in dataclasses.fields(SolverSettings)}
    assert own == {"solvers", "exact_max_params", "float64_max_params", "solver"}
    settings = SolverSettings(solver=dataclasses.replace(STUDY_SOLVER, cg_tol=1e-8))
    config = settings.config_for("cg", damping=0.03, seed=4, float32=False)
    assert isinstance(config, SolverConfig)
    assert (config.method, config.damping, config.damping_margin, config.seed) == (
        "cg",
        0.03,
        None,
        4,
    )
    assert config.cg_tol == 1e-8 and config.lissa_depth == STUDY_SOLVER.lissa_depth
    assert settings.config_for("cg", 0.03, 4, float32=True).cg_tol == 1e-5


def test_cells_run_the_whole_grid_once_before_any_repeat():
    config = FragilityConfig(
        architectures=(Architecture(1, 2), Architecture(2, 2)),
        weight_decays=(1e-3,),
        convex_models=("logistic",),
        repeats=2,
    )
    keys = [c.key for c in config.cells()]
    assert keys == [
        "Logistic regression (pixels) | wd 0.001 | repeat 0",
        "CNN d1 w2 | wd 0.001 | repeat 0",
        "CNN d2 w2 | wd 0.001 | repeat 0",
        "CNN d1 w2 | wd 0.001 | repeat 1",
        "CNN d2 w2 | wd 0.001 | repeat 1",
    ]
    assert config.training_seed(1) != config.training_seed(0)


#: A grid small enough for the test run: 7x7 pixels, 200 images, two 2-channel CNNs.
TINY = FragilityConfig(
    n_train=200,
    image_size=7,
    architectures=(Architecture(1, 2), Architecture(2, 2)),
    weight_decays=(1e-2, 0.0),
    training=TrainingConfig(epochs=20),
    ground_truth=GroundTruthConfig(top_k=8, seeds=2, noise_seeds=2),
    influence=SolverSettings(solver=dataclasses.replace(STUDY_SOLVER, lissa_depth=100)),
    repeats=1,
)


@pytest.fixture(scope="module")
def tiny_results():
    stages = []
    with torch_threads(1):
        results = run_fragility(TINY, lambda done, total, stage: stages.append((done, total)))
    return results, stages


@pytest.mark.slow
def test_tiny_grid_table_has_the_papers_shape(tiny_results, report):
    results, stages = tiny_results
    table = results.table()
    # Rows: two convex models, then each CNN with each solver; columns: 2 test points x 2 λ.
    assert table.shape == (2 + 2 * 3, 4)
    assert [r.label for r in table.rows[:2]] == [
        "Logistic regression (pixels)",
        "RBF SVM (pixels)",
    ]
    assert table.columns == (
        ("high_loss", 1e-2),
        ("high_loss", 0.0),
        ("median_loss", 1e-2),
        ("median_loss", 0.0),
    )
    text = table.to_text()
    assert "high-loss test point" in text and "CNN d2 w2 · LiSSA" in text
    report("tiny fragility grid:\n" + text)
    for row in table.rows[:2]:
        for (_, wd), cell in zip(table.columns, row.cells, strict=True):
            if wd > 0:
                assert cell.pearson >= 0.95, (row.label, cell)
    for row in table.rows[2:]:
        for cell in row.cells:
            assert math.isfinite(cell.pearson) and -1 <= cell.pearson <= 1
            assert math.isfinite(cell.spearman) and -1 <= cell.spearman <= 1
            assert cell.repeats == 1 and cell.n == 8
    assert stages and all(0 <= d <= t for d, t in stages) and stages[-1][0] == stages[-1][1]
    assert results.complete and results.load_average


@pytest.mark.slow
def test_tiny_grid_reports_damping_curvature_ground_truth_and_noise(tiny_results):
    results, _ = tiny_results
    for s in results.settings:
        if not s.is_network:
            continue
        curvature = s.curvature[0]
        assert curvature.method == "eigvalsh" and curvature.n_params == s.n_params
        for r in s.solvers:
            assert r.damping == pytest.approx(max(0.0, -curvature.smallest_eigenvalue) + 0.01)
            for p in r.points:
                assert len(p.predicted) == len(p.actual) == 8
                # The mean over seeds is what the correlation is computed against.
                np.testing.assert_allclose(np.mean(p.actual_by_seed, 0), p.actual)
                assert 0 <= p.noise.reliability <= 1
                assert p.noise.pearson_ceiling == pytest.approx(math.sqrt(p.noise.reliability))
        assert s.solver("cg").points[0].relative_error < 1e-4
        gt = s.ground_truth
        assert gt.n_retrained >= 8 and len(gt.seed_pearson) == 2
        # Two seeds with a control each, plus two noise seeds: four retrainings on every point.
        assert [len(c) for c in gt.control_losses] == [4, 4]
        assert all(v > 0 for v in gt.chance_std) and all(v > 0 for v in gt.effect_rms)
        assert s.precision == "float64" and s.seed == TINY.training_seed(0)
    # The convex models without weight decay have no finite optimum on these pixels.
    assert any(s.skipped for s in results.settings if not s.is_network)
    assert all(
        p.noise is None for s in results.settings if not s.is_network for r in s.solvers
        for p in r.points
    )  # fmt: skip


@pytest.mark.slow
def test_results_file_round_trips(tiny_results, tmp_path):
    results, _ = tiny_results
    path = save_results(results, tmp_path / "results.json")
    loaded = load_results(path)
    assert loaded.config == results.config
    assert loaded.table().to_text() == results.table().to_text()
    assert results_to_dict(loaded) == results_to_dict(results)
    assert loaded.settings[-1].solvers[0].points[0].noise == (
        results.settings[-1].solvers[0].points[0].noise
    )
    damaged = json.loads(path.read_text())
    damaged["format_version"] = FORMAT_VERSION - 1
    with pytest.raises(InfluenceExplorerError, match="format version"):
        results_from_dict(damaged)
    with pytest.raises(InfluenceExplorerError, match="No fragility results"):
        load_results(tmp_path / "missing.json")


@pytest.mark.slow
def test_trust_page_views(tiny_results):
    results, _ = tiny_results
    series = correlation_series(results, "depth", solver="exact", test_point="high_loss")
    assert len(series) == 2  # one per weight decay
    assert all([p.x for p in s.points] == [1, 2] for s in series)
    assert correlation_series(results, "width") == ()  # one width only
    comparisons = solver_comparison(results, "lissa", "exact")
    assert len(comparisons) == 2 * 2 * 2  # networks x weight decays x test points
    assert all(-1 <= c.score_pearson <= 1 for c in comparisons)
    records = results.records()
    assert {"depth", "width", "solver", "test_point", "pearson", "pearson_ceiling"} <= set(
        records[0]
    )
    floor = noise_floor(results)
    assert len(floor) == 2 * 2 * 2 * 3  # networks x λ x test points x solvers
    assert {r.verdict for r in floor} <= {"within noise", "below noise floor", "mixed"}
    markdown = results.table().to_markdown(noise=True)
    assert "(≤ " in markdown and markdown.count("\n") == 2 + 8 - 1


@pytest.mark.slow
def test_study_comparison_reads_each_number_against_its_counterpart(tiny_results):
    results, _ = tiny_results
    rows = study_comparison(results)
    assert [r.study for r in rows] == list(STUDY_NUMBERS)
    assert all(r.reading == "not run" for r in rows)  # the tiny grid has none of them
    # Make the tiny CNN d2 w2 pose as the study's small CNN's counterpart (CNN d2 w8), its
    # weight decay 0.01 as the study's 0.001.
    posed = dataclasses.replace(
        results,
        settings=tuple(
            dataclasses.replace(
                s, width=8, label="CNN d2 w8", weight_decay=1e-3 if s.weight_decay else 0.0
            )
            if s.label == "CNN d2 w2"
            else s
            for s in results.settings
        ),
    )
    small = [r for r in study_comparison(posed) if r.label == "CNN d2 w8"]
    assert {r.study.finding for r in small} == {
        "small CNN, with weight decay",
        "small CNN, without weight decay",
        "width: 8 channels",
    }
    for row in small:
        if row.study.weight_decay == 0.0:
            ours = next(s for s in posed.settings if s.label == "CNN d2 w8" and s.weight_decay == 0)
            assert row.cg_pearson == ours.solver("cg").point("high_loss").pearson
        differences = [
            mine - theirs
            for mine, theirs in (
                (row.cg_pearson, row.study.pearson),
                (row.cg_spearman, row.study.spearman),
            )
            if math.isfinite(theirs)
        ]
        if all(abs(d) <= 0.1 for d in differences):
            assert row.reading == "matches"
        else:
            assert row.reading == ("higher here" if sum(differences) > 0 else "lower here")


def test_run_setting_reports_progress():
    config = dataclasses.replace(
        TINY, ground_truth=GroundTruthConfig(top_k=5, seeds=1, noise_seeds=1)
    )
    seen = []
    result = run_setting(
        Setting("cnn", 1e-2, Architecture(1, 2)),
        dataclasses.replace(config, influence=SolverSettings(solvers=("exact",))),
        progress=lambda done, total, stage: seen.append((done, total, stage)),
    )
    assert [s.solver for s in result.solvers] == ["exact"]
    assert seen[-1][0] == seen[-1][1] and any("training" in s for _, _, s in seen)
    assert any("noise floor" in s for _, _, s in seen)


#: One tiny cell of the new families: 40 images, 3 epochs; 14x14 for LeNet-5 (it needs at least
#: 12x12), 7x7 for the ResNet.
NEW_FAMILIES = FragilityConfig(
    n_train=40,
    image_size=14,
    architectures=(Architecture.lenet5(), Architecture.resnet(8, 2)),
    weight_decays=(1e-3,),
    convex_models=(),
    training=TrainingConfig(epochs=3, batch_size=20),
    ground_truth=GroundTruthConfig(top_k=5, seeds=2, noise_seeds=1, retrain_fraction=0.34),
    influence=SolverSettings(
        exact_max_params=200,  # both get the last layer's exact Hessian, not the full one
        solver=dataclasses.replace(
            STUDY_SOLVER,
            damping_margin=0.1,
            cg_tol=1e-4,
            lanczos_iterations=20,
            lissa_depth=30,
            lissa_batch_size=20,
        ),
    ),
)


@pytest.mark.slow
@pytest.mark.parametrize(
    "architecture, precision",
    [(Architecture.lenet5(), "float32"), (Architecture.resnet(8, 2), "float64")],
    ids=["lenet5", "resnet8"],
)
def test_a_cell_of_each_new_family_runs_end_to_end(architecture, precision, report):
    """Train, CG and LiSSA on the whole network, the last layer's exact Hessian, retraining
    with two seeds and the noise floor, correlations: one small cell per family."""
    size = 14 if architecture.family == "lenet" else 7
    config = dataclasses.replace(NEW_FAMILIES, image_size=size)
    result = run_setting(Setting.network(architecture, 1e-3), config)
    assert result.model == architecture.family and result.label == architecture.label
    assert result.precision == precision  # LeNet-5 has 30k parameters: float32 products
    assert [(r.label, r.scope) for r in result.solvers] == [
        ("exact (last layer)", "last"),
        ("CG", "all"),
        ("LiSSA", "all"),
    ]
    assert [c.scope for c in result.curvature] == ["all", "last"]
    assert result.curvature[0].method == "lanczos"
    for r in result.solvers:
        assert not r.error, r.error
        for p in r.points:
            assert len(p.predicted) == 5 and np.isfinite(p.actual).all()
            assert math.isfinite(p.pearson) and -1 <= p.pearson <= 1
            assert len(p.actual_by_seed) == 2 and p.noise is not None
    cg, lissa = result.solver("cg"), result.solver("lissa")
    assert "iterations" in cg.note and "slowest direction" in lissa.note
    assert lissa.points[0].relative_error < 1.0  # compared with CG on the same parameters
    assert result.ground_truth.n_retrained >= 5
    report(
        f"{result.label}: {result.n_params} parameters, "
        + "; ".join(f"{r.label} {r.points[0].pearson:.2f}" for r in result.solvers)
        + f" ({result.seconds:.1f} s)"
    )


# ---------------------------------------------------------------------------- long runs
#: Two cells of one tiny CNN: enough to stop after the first and resume.
TWO_CELLS = dataclasses.replace(
    TINY,
    architectures=(Architecture(1, 2),),
    convex_models=(),
    ground_truth=GroundTruthConfig(top_k=4, seeds=2, noise_seeds=1),
    influence=SolverSettings(solvers=("exact",)),
)


class _Stop(Exception):
    pass


@pytest.mark.slow
def test_a_stopped_grid_resumes_from_its_last_finished_cell(tmp_path, monkeypatch):
    progress_file = progress_path(tmp_path / "out.json")
    assert progress_file.name == "out.json.progress"

    def stop_after_first(result, index, total):
        raise _Stop  # like a kill right after the first cell was written

    with pytest.raises(_Stop):
        run_fragility(TWO_CELLS, progress_file=progress_file, on_cell=stop_after_first)
    saved = json.loads(progress_file.read_text())
    assert [key for key, _ in saved["cells"]] == ["CNN d1 w2 | wd 0.01 | repeat 0"]
    assert not list(tmp_path.glob(".out.json.progress.*"))  # no temporary file left behind

    # A partial results file: the finished cell, the other marked as not run.
    partial = results_from_progress(progress_file)
    assert partial.missing == ("CNN d1 w2 | no weight decay | repeat 0",)
    assert partial.table().rows[0].cells[1].note.startswith("not run")

    ran = []
    real = running_module.run_network_cell
    monkeypatch.setattr(
        running_module,
        "run_network_cell",
        lambda cell, *args: ran.append(cell.key) or real(cell, *args),
    )
    resumed = run_fragility(TWO_CELLS, progress_file=progress_file)
    assert ran == ["CNN d1 w2 | no weight decay | repeat 0"]  # the first cell was not redone
    assert resumed.complete and len(resumed.settings) == 2
    # The resumed grid's first cell is the one read back from the progress file.
    assert results_to_dict(resumed)["settings"][0] == results_to_dict(partial)["settings"][0]


@pytest.mark.slow
def test_a_progress_file_of_another_run_is_refused(tmp_path):
    progress_file = tmp_path / "out.json.progress"
    with pytest.raises(_Stop):
        run_fragility(
            TWO_CELLS,
            progress_file=progress_file,
            on_cell=lambda *args: (_ for _ in ()).throw(_Stop()),
        )
    other = dataclasses.replace(TWO_CELLS, n_train=100)
    with pytest.raises(InfluenceExplorerError, match="another protocol"):
        run_fragility(other, progress_file=progress_file)
    progress_file.write_text("{not json")
    with pytest.raises(InfluenceExplorerError, match="Cannot read"):
        run_fragility(TWO_CELLS, progress_file=progress_file)


@pytest.mark.slow
def test_a_grid_can_be_narrowed_and_extended_keeping_its_finished_cells(tmp_path, monkeypatch):
    """Same protocol, another grid: finished cells the new grid has are reused, not rerun."""
    progress_file = tmp_path / "out.json.progress"
    one = dataclasses.replace(TWO_CELLS, weight_decays=(0.0,))
    first = run_fragility(one, progress_file=progress_file)
    ran = []
    real = running_module.run_network_cell
    monkeypatch.setattr(
        running_module,
        "run_network_cell",
        lambda cell, *args: ran.append(cell.key) or real(cell, *args),
    )
    both = run_fragility(TWO_CELLS, progress_file=progress_file)
    assert ran == ["CNN d1 w2 | wd 0.01 | repeat 0"]
    assert results_to_dict(both)["settings"][1] == results_to_dict(first)["settings"][0]
    assert both.config == TWO_CELLS
    # Narrowed again: nothing runs, and the file keeps the cell the narrow grid does not have.
    again = run_fragility(one, progress_file=progress_file)
    assert len(ran) == 1 and [s.weight_decay for s in again.settings] == [0.0]
    assert len(json.loads(progress_file.read_text())["cells"]) == 2
    assert results_from_progress(progress_file, TWO_CELLS).complete


def test_bundled_results_load_when_present():
    path = bundled_results_path()
    if not path.exists():
        pytest.skip("docs/fragility-results.json not generated yet")
    results = load_results(path)
    assert results.table().shape[1] == 2 * len(results.config.weight_decays)
    assert np.isfinite([r["pearson"] for r in results.records()]).any()
    assert len(study_comparison(results)) == len(STUDY_NUMBERS)
