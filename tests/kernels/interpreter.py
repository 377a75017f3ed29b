"""Run kernel modules through Triton's interpreter for the length of a `with` block.

kernels.dispatch reads TRITON_INTERPRET once at import and Triton reads it when @triton.jit
decorates, and an earlier test module may already have imported both without it. So this sets the
variable, reloads the given modules (in order: dispatch first), and afterwards restores the
variable and reloads them again, so the test modules that follow see the normal CPU dispatch.
"""
import contextlib
import importlib
import os


@contextlib.contextmanager
def triton_interpreter(*modules):
    """-> the reloaded modules, in the order given."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield [importlib.reload(module) for module in modules]
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET")
        else:
            os.environ["TRITON_INTERPRET"] = old
        for module in modules:
            importlib.reload(module)
