"""The wheel carries what `peftcore train` with no config needs: every file under examples/ is
matched by pyproject's package-data for peftcore.examples (checked by hand once by building the
wheel, installing it with --target and running the default job from it)."""
import sys
from pathlib import Path

from peftcore import builtin

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_example_file_is_package_data():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"]["peftcore.examples"] == "examples"
    patterns = setuptools["package-data"]["peftcore.examples"]
    files = [p.relative_to(ROOT / "examples") for p in (ROOT / "examples").rglob("*") if p.is_file()]
    unpackaged = [f for f in files if not any(f.match(p) and len(f.parts) == len(Path(p).parts) for p in patterns)]
    assert files and not unpackaged, f"add to [tool.setuptools.package-data]: {unpackaged}"


def test_the_examples_are_found_from_a_source_checkout():
    assert builtin.EXAMPLES_DIR == ROOT / "examples" and (builtin.DATA_DIR / "support_train.jsonl").is_file()
