"""The wheel carries what `peftcore train` with no config needs: every file under examples/ is
matched by pyproject's package-data for peftcore.examples (checked by hand once by building the
wheel, installing it with --target and running the default job from it)."""
import sys
from pathlib import Path

from peftcore.jobs import builtin

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_example_file_is_package_data():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"]["peftcore.examples"] == "examples"
    patterns = setuptools["package-data"]["peftcore.examples"]
    # scripts (examples/api_tour.py) run from a checkout; a wheel would make them importable modules that run
    files = [p.relative_to(ROOT / "examples") for p in (ROOT / "examples").rglob("*")
             if p.is_file() and p.suffix not in (".py", ".pyc")]
    unpackaged = [f for f in files if not any(f.match(p) and len(f.parts) == len(Path(p).parts) for p in patterns)]
    assert files and not unpackaged, f"add to [tool.setuptools.package-data]: {unpackaged}"


def test_the_examples_are_found_from_a_source_checkout():
    assert builtin.EXAMPLES_DIR == ROOT / "examples" and (builtin.DATA_DIR / "support_train.jsonl").is_file()


def imported_top_level_modules(folder: Path) -> set[str]:
    """Every absolute import in the folder's code, deferred ones (inside functions) included."""
    import ast

    names = set()
    for file in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"peftcore", "__future__"}


def requirement_name(requirement: str) -> str:
    import re

    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_the_test_extra_installs_everything_the_library_imports():
    """A fresh venv with `.[test]` must hold every package library code can import: matplotlib was only
    in the `plot` extra, so 7 tests failed for a new user while CI's machine had it by hand."""
    from importlib.metadata import packages_distributions

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {requirement_name(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]}
    providers = packages_distributions()
    imported = set().union(*(imported_top_level_modules(ROOT / d) for d in ("peftcore", "models", "kernels")))
    # a module not installed here (tomli on Python >= 3.11) is looked up by its own name
    undeclared = {module: providers.get(module, [module]) for module in sorted(imported)
                  if not {requirement_name(d) for d in providers.get(module, [module])} & declared}
    assert not undeclared, (
        f"library code imports these, but neither dependencies nor the test extra install them: {undeclared}"
    )


def test_every_subpackage_is_in_the_wheel():
    """pyproject lists packages by hand (package-dir maps kernels/ and models/): a new folder under
    peftcore/ that is not listed is left out of the wheel while an editable install still finds it."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "peftcore").rglob("__init__.py")}
    assert folders <= listed, f"add to [tool.setuptools] packages: {sorted(folders - listed)}"
