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
