"""DESIGN's architecture rules, read off the code: no import circle in peftcore/ (imports deferred into
function bodies count: they hide a circle, they do not break it) and no import from a lower layer to a
higher one. The layers, top to bottom, are the README's architecture map."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"peftcore": ROOT / "peftcore", "peftcore.models": ROOT / "models", "peftcore.kernels": ROOT / "kernels"}

# top to bottom; a module may import its own layer's modules and any layer below, never one above
LAYERS = [
    ["peftcore.__main__"],
    ["peftcore.cli"],
    ["peftcore"],  # the package's face: it re-exports the API, so nothing inside may import it
    ["peftcore.jobs"],
    ["peftcore.training", "peftcore.multitask"],
    ["peftcore.analysis"],
    ["peftcore.peft_model", "peftcore.functional"],
    ["peftcore.lora_backend", "peftcore.prompt_backend"],
    ["peftcore.adapter_io"],
    ["peftcore.adapter_keys"],
    ["peftcore.methods"],
    ["peftcore.adalora"],  # AdaLoRA's config is a LoraConfig and its layers reuse LoRA's helpers
    ["peftcore.lora", "peftcore.prompt", "peftcore.ia3", "peftcore.lycoris", "peftcore.vera", "peftcore.oft"],
    ["peftcore.config", "peftcore.data", "peftcore._json", "peftcore._logging", "peftcore._version"],
    ["peftcore.models"],
    ["peftcore.kernels"],
]


def module_files() -> dict[str, Path]:
    modules = {}
    for package, folder in PACKAGE_DIRS.items():
        for file in folder.rglob("*.py"):
            parts = list(file.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            name = ".".join([package, *parts])
            if package == "peftcore" and name.split(".")[1:2] in (["models"], ["kernels"], ["examples"]):
                continue  # no such folders under peftcore/; guards against a stray one
            modules[name] = file
    return modules


def imported_modules(name: str, file: Path, known: set[str]) -> set[str]:
    """Every peftcore module the file imports, at any depth of its code; `from pkg import mod` counts mod."""
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            submodules = {f"{base}.{alias.name}" for alias in node.names}
            found |= submodules
            if not submodules <= known:  # `from pkg import name` takes a name of pkg's face; of modules only, not
                found.add(base)
    return {owner_module(m, known) for m in found if owner_module(m, known)} - {name}


def owner_module(dotted: str, known: set[str]) -> str | None:
    while dotted and dotted not in known:
        dotted = dotted.rpartition(".")[0]
    return dotted or None


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imported_modules(name, file, set(files)) for name, file in files.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of more than one module (or a module importing itself)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v), on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layer_of(module: str) -> int:
    best = None
    for depth, layer in enumerate(LAYERS):
        for prefix in layer:
            if module == prefix or module.startswith(prefix + ".") and prefix != "peftcore":
                if best is None or len(prefix) > best[1]:
                    best = (depth, len(prefix))
    assert best is not None, f"{module} is in no layer of tests/test_architecture.py: add it to LAYERS"
    return best[0]


def test_no_import_circle_in_the_package():
    found = circles(import_graph())
    assert not found, "import circles (deferred imports count):\n" + "\n".join(" <-> ".join(c) for c in found)


def test_every_import_points_down_the_layers():
    upward = [f"{a} imports {b}" for a, targets in sorted(import_graph().items()) for b in sorted(targets)
              if layer_of(b) < layer_of(a)]
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def test_the_checker_sees_deferred_and_relative_imports(tmp_path):
    """The checker itself: a circle closed only by a relative import inside a function is found."""
    (tmp_path / "a.py").write_text("def f():\n    from .b import g\n")
    (tmp_path / "b.py").write_text("from pkg import a\n")
    known = {"pkg.a", "pkg.b"}
    graph = {"pkg.a": imported_modules("pkg.a", tmp_path / "a.py", known),
             "pkg.b": imported_modules("pkg.b", tmp_path / "b.py", known)}
    assert circles(graph) == [["pkg.a", "pkg.b"]]
