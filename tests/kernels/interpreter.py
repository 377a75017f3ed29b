"""Run kernel modules through Triton's interpreter for the length of a `with` block, or a script
through Triton's real compiler in a fresh process (run_compiled).

kernels.dispatch reads TRITON_INTERPRET once at import and Triton reads it when @triton.jit
decorates, and an earlier test module may already have imported the kernel modules without it. So
this sets the variable and reloads, in order, what the kernel modules read at import (dispatch and
the shared jit helpers of kernels/_triton.py) and then the given modules; afterwards it restores the
variable and reloads them all again, so the test modules that follow see the normal CPU dispatch.
"""
import contextlib
import importlib
import os
import subprocess
import sys

SHARED = ("peftcore.kernels.dispatch", "peftcore.kernels._triton")  # imported by every kernel module


def _reload(modules) -> list:
    for name in SHARED:
        importlib.reload(importlib.import_module(name))
    return [importlib.reload(module) for module in modules]


@contextlib.contextmanager
def triton_interpreter(*modules):
    """-> the given kernel modules reloaded, in the order given (a module before those importing it)."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield _reload(modules)
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET")
        else:
            os.environ["TRITON_INTERPRET"] = old
        _reload(modules)


def run_compiled(script: str) -> subprocess.CompletedProcess:
    """`python -c script` without TRITON_INTERPRET, so its kernels meet Triton's compiler (offline
    compiles need no GPU); a subprocess, because a module fixture may hold the kernels interpreted."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton 3.9 warns when unset; 1 is its current default
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
