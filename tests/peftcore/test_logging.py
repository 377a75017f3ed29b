"""peftcore's messages go through the "peftcore" logger; the CLI prints them, rank 0 only."""
import logging

import pytest

from peftcore._logging import LOGGER, log_to_stdout, quiet


@pytest.fixture
def fresh_logger():
    logger = logging.getLogger(LOGGER)
    saved = logger.handlers[:], logger.level, logger.propagate
    logger.handlers.clear()
    yield logger
    logger.handlers[:], logger.level, logger.propagate = saved


def test_the_cli_handler_prints_on_the_stdout_of_the_moment_once(fresh_logger, capsys):
    log_to_stdout()
    log_to_stdout()  # idempotent: one handler
    logging.getLogger("peftcore.jobs.train").info("before: loss 1.0")
    assert capsys.readouterr().out == "before: loss 1.0\n"


def test_other_ranks_print_only_warnings(fresh_logger, capsys, monkeypatch):
    log_to_stdout()
    monkeypatch.setenv("RANK", "1")
    child = logging.getLogger("peftcore.jobs.train")
    child.info("every rank would repeat this")
    child.warning("rank 1 ran out of disk")
    assert capsys.readouterr().out == "rank 1 ran out of disk\n"


def test_quiet_holds_back_info_and_restores_the_level(fresh_logger, capsys):
    log_to_stdout()
    with quiet():
        logging.getLogger("peftcore.jobs.tasks").info("building the built-in model")
    logging.getLogger("peftcore.jobs.tasks").info("after")
    assert capsys.readouterr().out == "after\n" and fresh_logger.level == logging.INFO
