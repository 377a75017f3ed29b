"""peftcore's progress messages: the logger "peftcore", whose modules log to its children
(`logging.getLogger(__name__)`), so a program that embeds peftcore configures or silences them the
standard way (`logging.getLogger("peftcore").setLevel(logging.WARNING)`).

The command line calls `log_to_stdout()`: INFO and above as plain lines on stdout, from rank 0 only
under torchrun (N ranks would print every line N times); a warning or an error from another rank
still shows.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys

LOGGER = "peftcore"


class RankZeroFilter(logging.Filter):
    """Passes every record on rank 0 (and without torchrun); elsewhere only warnings and errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        rank = int(os.environ.get("RANK", "0"))  # torchrun sets RANK for every process it starts
        return rank == 0 or record.levelno >= logging.WARNING


class CurrentStdout(logging.StreamHandler):
    """Writes to whatever sys.stdout is when a record comes: a redirect (pytest's capsys, contextlib's
    redirect_stdout) made after the handler still catches the lines."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stdout  # not setStream(): it would flush the previous stream, which may be closed
        super().emit(record)


def log_to_stdout(level: int = logging.INFO) -> None:
    """Print peftcore's messages (idempotent: a second call adds no second handler)."""
    logger = logging.getLogger(LOGGER)
    logger.setLevel(level)
    if not any(isinstance(h, CurrentStdout) for h in logger.handlers):
        handler = CurrentStdout()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.addFilter(RankZeroFilter())
        logger.addHandler(handler)
    logger.propagate = False  # a root handler (an embedding program's) would print every line twice


@contextlib.contextmanager
def quiet():
    """Only warnings and errors inside the block: loading a model for `peftcore generate`, whose stdout
    is the generated text alone."""
    logger = logging.getLogger(LOGGER)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)
