"""benchmarks/quick.py's verdicts: the CPU kind its figures are recorded under, and which
measured ratios count as regressions against the recorded ones (no measuring here)."""

import json
import runpy
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def quick():
    with pytest.MonkeyPatch.context() as patch:
        # Loaded as on a plain CPU: with TRANSFERKIT_TEST_CPU set it would cap oneDNN in this process.
        patch.delenv("TRANSFERKIT_TEST_CPU", raising=False)
        return runpy.run_path(str(BENCHMARKS / "quick.py"), run_name="quick_benchmark")


@pytest.mark.parametrize("flags, emulated, kind", [
    ({"avx2", "avx512f", "avx512_bf16", "amx_bf16"}, "", "amx"),
    ({"avx2", "avx512f", "avx512_bf16"}, "", "avx512_bf16"),
    ({"avx2", "avx512f"}, "", "avx512"),
    ({"avx2"}, "", "avx2"),
    ({"avx2", "avx512f", "amx_bf16"}, "avx2", "avx2-emulated"),
    ({"avx2"}, "avx2", "avx2"),
])
def test_figures_are_keyed_by_the_cpu_kind_that_decides_kernels_and_precision(quick, flags, emulated, kind):
    assert quick["cpu_kind"](flags, emulated) == kind


def test_a_ratio_slower_than_recorded_beyond_the_tolerance_is_a_regression_named_with_its_figures(quick):
    recorded = {"finetune_over_keras": {"value": 1.0}, "predict_over_keras": {"value": 0.4}}
    measured = {"finetune_over_keras": 1.3, "predict_over_keras": 0.45, "new_figure": 2.0}
    lines, regressions = quick["compare"](recorded, measured, tolerance=0.25)
    assert regressions == ["REGRESSION: finetune_over_keras measured 1.300, recorded 1.000 "
                           "(allowed up to 1.250, +25%)"]
    assert lines[1].startswith("ok: predict_over_keras measured 0.450")
    assert lines[2] == "new_figure: 2.000 (not recorded for this CPU kind: run with --record)"


def test_recorded_figures_name_a_known_kind_and_every_measured_figure(quick):
    recorded = json.loads((BENCHMARKS / "quick_figures.json").read_text())
    assert set(recorded) <= {"amx", "avx512_bf16", "avx512", "avx2", "avx2-emulated"}
    for figures in recorded.values():
        # A kind may lack a figure whose measure changed until it is re-recorded there.
        assert figures and set(figures) <= {"finetune_over_keras", "predict_over_keras"}
        assert all(figure["value"] > 0 and figure["recorded"] and figure["commit"] for figure in figures.values())
