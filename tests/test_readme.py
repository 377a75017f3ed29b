"""The README's promises that CI relies on."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quick_start_lines() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"^## Quick start\n.*?```bash\n(.*?)```", text, re.S | re.M)
    assert block, "README.md has no ## Quick start section with a ```bash block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_quick_start_has_exactly_two_lines():
    assert len(quick_start_lines()) == 2


def test_ci_runs_the_readme_test_command():
    ci_lines = [line.strip() for line in (ROOT / ".ci/run").read_text().splitlines()]
    assert quick_start_lines()[1].strip() in ci_lines


def test_ci_installs_into_a_fresh_venv_and_runs_the_slow_lane_too():
    """The machine CI runs on keeps packages installed by hand: only a venv made by .ci/run itself shows
    a missing install step. The default lane deselects `slow`; CI must still run it."""
    lines = [line.strip() for line in (ROOT / ".ci/run").read_text().splitlines() if not line.strip().startswith("#")]
    made = next(i for i, line in enumerate(lines) if "-m venv" in line)
    activated = next(i for i, line in enumerate(lines) if line.startswith("source") and "activate" in line)
    installs = [i for i, line in enumerate(lines) if "pip install" in line]
    assert made < activated < min(installs)
    assert "python -m pytest -q -m slow" in lines
    assert "python -m pytest -q -m slow" in (ROOT / "README.md").read_text()


def architecture_map_paths() -> set[str]:
    """The files the README's architecture map names: `dir/a.py`, `b.py` in one cell means dir/a.py, dir/b.py."""
    text = (ROOT / "README.md").read_text()
    section = re.search(r"^## Architecture map\n(.*?)^## ", text, re.S | re.M)
    assert section, "README.md has no ## Architecture map section"
    named = set()
    for row in re.findall(r"^\| (.+?) \|", section.group(1), re.M):
        folder = None
        for name in re.findall(r"`([^`]+\.py)`", row):
            if "/" in name:
                folder = name.rpartition("/")[0]
                named.add(name)
            elif folder:
                named.add(f"{folder}/{name}")
    return named


def test_the_architecture_map_names_every_module_and_only_modules_that_exist():
    packages = ("peftcore", "models", "kernels")
    modules = {p.relative_to(ROOT).as_posix()
               for d in packages for p in (ROOT / d).rglob("*.py") if p.name != "__init__.py"}
    named = {name for name in architecture_map_paths() if name.startswith(tuple(d + "/" for d in packages))}
    assert not modules - named, f"modules missing from the README's architecture map: {sorted(modules - named)}"
    assert not named - modules, (
        f"the README's architecture map names files that do not exist: {sorted(named - modules)}"
    )


def test_the_api_tour_block_is_the_script_that_runs():
    from tests.test_api_tour import tour_part

    section = (ROOT / "README.md").read_text().split("## API tour\n", 1)[1]
    block = section.split("```python\n", 1)[1].split("```\n", 1)[0]
    assert block == tour_part(), "README's API tour differs from examples/api_tour.py's tour part: copy it over"
