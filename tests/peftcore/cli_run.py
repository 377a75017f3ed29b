"""The `peftcore` command run in-process, as the console script runs it: -> (exit code, stdout, stderr)."""
import contextlib
import io

from peftcore.cli import main


def run(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()
