"""The package as a user installs it and as a contributor reads it: sub-packages listed for
the wheel, recipes shipped, no import circles, lower layers never importing higher ones."""

import ast
import tomllib
from pathlib import Path

import transferkit

ROOT = Path(transferkit.__file__).resolve().parent
PYPROJECT = tomllib.loads((ROOT.parent / "pyproject.toml").read_text(encoding="utf-8"))

# Lowest first. A module may import its own layer (without a circle) and the ones below it.
LAYERS = (
    {"errors", "outputs", "files", "locks", "runtime", "progress"},
    {"backbones", "recipe", "keras_private"},
    {"data", "runs"},
    {"model"},
    {"inference"},
    {"training"},
    {"evaluation", "export"},
    {"workflow"},
    {"tuning"},
    {"cli", "__main__", "__init__"},
)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every transferkit module a file imports, at its top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("transferkit")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("transferkit"):
            found.add(node.module)
            # "from transferkit.data import arrays" imports the module transferkit.data.arrays
            found |= {f"{node.module}.{alias.name}" for alias in node.names
                      if (ROOT.parent / f"{node.module}.{alias.name}".replace(".", "/")).with_suffix(".py").is_file()}
    return found


def graph() -> dict[str, set[str]]:
    """Module -> the transferkit modules it imports. The package root is left out: its
    names load lazily, and ``from transferkit import __version__`` reads the package that
    every import of a sub-module has already run."""
    modules = {module_name(path): path for path in ROOT.rglob("*.py")}
    del modules["transferkit"]
    return {name: {target for target in imports_of(path) if target in modules and target != name}
            for name, path in modules.items()}


def layer_of(module: str) -> int:
    parts = module.split(".")
    key = parts[1] if len(parts) > 1 else "__init__"
    return next(index for index, names in enumerate(LAYERS) if key in names)


def test_every_sub_package_on_disk_is_in_the_wheel():
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    on_disk = {module_name(path) for path in ROOT.rglob("__init__.py")}
    assert on_disk | {"transferkit.recipes"} == listed


def test_the_shipped_recipes_are_package_data():
    from transferkit.recipe import available_recipes

    on_disk = sorted(path.stem for path in (ROOT.parent / "recipes").glob("*.toml"))
    assert available_recipes() == on_disk and "small-data" in on_disk
    assert PYPROJECT["tool"]["setuptools"]["package-dir"]["transferkit.recipes"] == "recipes"


def test_every_module_says_what_it_owns():
    for path in ROOT.rglob("*.py"):
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
        assert doc and len(doc) > 20, f"{path} has no opening docstring"


def test_no_import_circle():
    edges = graph()
    state: dict[str, int] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges[module]):
            if state.get(target) == 1:
                circle = trail[trail.index(target):] + [target] if target in trail else [module, target]
                raise AssertionError("import circle: " + " -> ".join(circle))
            if target not in state:
                visit(target, trail + [target])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])


def test_lower_layers_never_import_higher_ones():
    upward = [f"{module} imports {target}" for module, targets in graph().items() for target in targets
              if layer_of(target) > layer_of(module)]
    assert not upward, "; ".join(sorted(upward))


def test_data_checks_and_listings_do_not_load_keras():
    import subprocess
    import sys

    code = ("import sys, transferkit.data.doctor, transferkit.data.images, transferkit.recipe, transferkit.cli; "
            "print(sorted(m for m in ('keras', 'tensorflow') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_no_private_name_is_imported_across_modules():
    private = []
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("transferkit"):
                private += [f"{module_name(path)} imports {node.module}.{alias.name}" for alias in node.names
                            if alias.name.startswith("_") and alias.name != "__version__"]
    assert not private, "; ".join(private)
