"""The size rules of the architecture issue, read off the code: no library file over 500 lines, no
function over 60 lines outside @triton.jit bodies (a kernel body is one unit a reader follows)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_FILE_LINES, MAX_FUNCTION_LINES = 500, 60


def library_files() -> list[Path]:
    return sorted(p for d in ("peftcore", "models", "kernels") for p in (ROOT / d).rglob("*.py"))


def is_jit(node: ast.FunctionDef) -> bool:
    return any("jit" in ast.unparse(decorator) for decorator in node.decorator_list)


def long_functions(file: Path, root: Path = ROOT) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not is_jit(node):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION_LINES:
                found.append(f"{file.relative_to(root)}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_no_library_file_is_over_500_lines():
    sizes = {f.relative_to(ROOT).as_posix(): f.read_text(encoding="utf-8").count("\n") for f in library_files()}
    assert not {f: n for f, n in sizes.items() if n > MAX_FILE_LINES}


def test_no_function_is_over_60_lines_outside_triton_kernels():
    assert not [entry for f in library_files() for entry in long_functions(f)]


def test_the_function_check_sees_a_long_function_and_skips_a_kernel(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "m.py").write_text(f"def long():\n{body}\n\n@triton.jit\ndef kernel():\n{body}\n")
    found = long_functions(tmp_path / "m.py", root=tmp_path)
    assert len(found) == 1 and "long" in found[0] and "kernel" not in found[0]


def test_the_code_passes_the_linter():
    """pyproject's [tool.ruff] (line length 120, pycodestyle, pyflakes, import order) holds for the whole tree."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-1000:]
