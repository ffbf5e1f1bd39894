import importlib
import subprocess
import sys

import transferkit


def test_all_is_sorted_and_every_name_resolves():
    names = [name for name in transferkit.__all__ if name != "__version__"]
    assert names == sorted(names)
    for name in transferkit.__all__:
        assert getattr(transferkit, name) is not None


def test_every_lazy_export_is_listed_in_all():
    assert set(transferkit._EXPORTS) | {"__version__"} == set(transferkit.__all__)


def test_public_functions_have_docstrings_with_returns():
    for name in ("load_backbone", "build_classifier", "build_model", "prepare_data", "begin_stage", "load_recipe",
                 "finetune", "train_prepared", "load_run", "predict_folder"):
        doc = getattr(transferkit, name).__doc__
        assert doc and "Returns" in doc, name


def test_unknown_attribute_raises_attribute_error():
    try:
        _ = transferkit.no_such_name
    except AttributeError as error:
        assert "no_such_name" in str(error)
    else:
        raise AssertionError("expected AttributeError")


def test_python_dash_m_prints_version():
    result = subprocess.run(
        [sys.executable, "-m", "transferkit", "--version"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0
    assert result.stdout.strip() == f"transferkit {transferkit.__version__}"


def test_backbones_module_imports_documented_names():
    module = importlib.import_module("transferkit.backbones")
    assert callable(module.load_backbone) and callable(module.available_backbones)
