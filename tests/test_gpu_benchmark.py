"""benchmarks/gpu.py on whatever this machine has (a CPU here): its --quick mode prints one JSON
line per precision and device count with the device, the forward baseline and the stages; and
its choice of mixed precision per GPU generation."""

import json
import runpy
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


@pytest.fixture(scope="module")
def benchmark():
    return runpy.run_path(str(SCRIPT), run_name="gpu_benchmark")


def test_quick_mode_prints_a_line_per_precision_against_the_forward_pass(benchmark, capsys):
    import tensorflow as tf

    # float32 only: mixed precision is the same code under another policy (chosen below).
    assert benchmark["main"](["--quick", "--precisions", "float32"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    gpus = tf.config.list_physical_devices("GPU")
    assert len(lines) == (1 if len(gpus) < 2 else 2)
    assert {line["precision"] for line in lines} == {"float32"}
    for line in lines:
        assert line["benchmark"] == "gpu" and line["unit"] == "images/s" and line["backbone"] == "vgg16"
        assert line["device"]["kind"] == ("GPU" if gpus else "CPU") and line["device"]["name"]
        assert line["size"] == 32 and line["global_batch"] == line["batch_per_device"] * line["devices_used"]
        assert line["forward"] > 0 and set(line["stages"]) == {"head", "head_cached"}
        for stage, value in line["stages"].items():
            assert value > 0 and line["over_forward"][stage] == pytest.approx(value / line["forward"], abs=1e-3)


@pytest.mark.parametrize("capability, policy", [
    ("9.0", "mixed_bfloat16"), ("8.0", "mixed_bfloat16"), ("7.5", "mixed_float16"), ("7.0", "mixed_float16"),
    ("6.1", None),
])
def test_mixed_precision_follows_the_gpu_generation(benchmark, capability, policy):
    assert benchmark["mixed_policy"]([{"name": "GPU", "compute_capability": capability}])[0] == policy
    assert benchmark["mixed_policy"]([])[0] == "mixed_bfloat16"  # a CPU
