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
    {"errors", "outputs", "files", "locks", "runtime", "backend", "strategies", "keras_private", "progress"},
    {"backbones", "recipe"},
    {"data", "runs"},
    {"model"},
    {"inference"},
    {"training"},
    {"evaluation", "export", "trust"},
    {"serve", "run_folder"},
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


def module_aliases(tree: ast.AST) -> dict[str, str]:
    """Local names bound to transferkit modules: ``import transferkit.x as y``, ``from
    transferkit import runs``, ``from transferkit.training import stages as s``."""
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("transferkit"):  # "import transferkit.runs" binds "transferkit"
                    aliases[alias.asname or "transferkit"] = alias.name if alias.asname else "transferkit"
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("transferkit"):
            for alias in node.names:
                target = f"{node.module}.{alias.name}"
                if (ROOT.parent / target.replace(".", "/")).with_suffix(".py").is_file() or \
                        (ROOT.parent / target.replace(".", "/") / "__init__.py").is_file():
                    aliases[alias.asname or alias.name] = target
    return aliases


def dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def test_no_private_name_of_another_module_is_reached_through_attributes():
    """``workflow._prepare`` is as private as ``from transferkit.workflow import _prepare``."""
    reached = []
    for path in ROOT.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        aliases = module_aliases(tree)
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")):
                continue
            base = dotted(node.value)
            if base is None:
                continue
            head, _, rest = base.partition(".")
            if head in aliases:
                module = aliases[head] + (f".{rest}" if rest else "")
                if module != module_name(path):
                    reached.append(f"{module_name(path)} reads {module}.{node.attr}")
    assert not reached, "; ".join(sorted(reached))


def test_the_private_attribute_check_sees_what_it_is_meant_to():
    source = ("from transferkit import workflow\nimport transferkit.runs\n"
              "from transferkit.training import stages as s\n"
              "workflow._prepare(); transferkit.runs._flush_tree(); s._Run; workflow.finetune; s.__doc__\n")
    tree = ast.parse(source)
    aliases = module_aliases(tree)
    seen = sorted(f"{dotted(node.value)}.{node.attr}" for node in ast.walk(tree)
                  if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                  and (dotted(node.value) or "").split(".")[0] in aliases)
    assert seen == ["s._Run", "transferkit.runs._flush_tree", "workflow._prepare"]


def exception_classes_outside_errors() -> set[str]:
    """Every class outside errors.py that derives from an exception: a built-in one, one of
    errors.py's, or another such class (by name, as the source spells its bases)."""
    import builtins

    errors_tree = ast.parse((ROOT / "errors.py").read_text(encoding="utf-8"))
    exception_names = {node.name for node in errors_tree.body if isinstance(node, ast.ClassDef)}
    exception_names |= {name for name, value in vars(builtins).items()
                        if isinstance(value, type) and issubclass(value, BaseException)}
    classes = []
    for path in ROOT.rglob("*.py"):
        if path.name == "errors.py" and path.parent == ROOT:
            continue
        classes += [(f"{module_name(path)}.{node.name}", node) for node in ast.walk(ast.parse(path.read_text(
            encoding="utf-8"))) if isinstance(node, ast.ClassDef)]
    found: set[str] = set()
    while True:  # a class deriving from one found is an exception too
        more = {qualified for qualified, node in classes
                if any(ast.unparse(base).split(".")[-1] in exception_names for base in node.bases)}
        if more <= found:
            return found
        found |= more
        exception_names |= {qualified.rsplit(".", 1)[-1] for qualified in more}


def test_no_exception_class_is_defined_outside_errors():
    outside = exception_classes_outside_errors()
    assert not outside, f"define these in transferkit/errors.py, in its tree: {sorted(outside)}"


def test_every_exception_in_errors_is_public():
    import inspect

    from transferkit import errors

    defined = {name for name, value in vars(errors).items()
               if inspect.isclass(value) and issubclass(value, BaseException) and value.__module__ == errors.__name__}
    assert defined and defined <= set(transferkit.__all__), sorted(defined - set(transferkit.__all__))


def test_the_errors_docstring_draws_every_exception():
    from transferkit import errors

    public = {name for name in transferkit.__all__ if name in vars(errors) and isinstance(vars(errors)[name], type)}
    drawn = {line.split("── ")[1].split()[0] for line in errors.__doc__.splitlines() if "── " in line}
    assert public - {"TransferkitError"} == drawn
