"""What a run tells the outside as it goes: the Reporter that sends each step's record to metrics.jsonl, the
progress bar, the callbacks (Python code watching, or stopping, the one loop without
copying it) and the log sinks a recipe names in `[train] log_to` (metrics.csv, TensorBoard events). metrics.jsonl
is always written (peftcore.training.state.MetricsLog); the sinks receive exactly its records.

    class StopAtLoss:
        def on_step(self, state, record):
            if record["loss"] < 0.5:
                state.stopped_early = True   # the loop ends after this step; the final checkpoint is still written

    train(model, rows, eval_rows, config, "runs/x", callbacks=[StopAtLoss()])

A callback is any object with some of these methods (the others are simply not called; no base class):
    on_step(state, record)    after every optimizer step: the step's record (eval keys included on eval steps)
    on_eval(state, metrics)   after every evaluation, the step-0 one (config.eval_on_start) included
    on_log(state, record)     a record written to metrics.jsonl (every log_every steps, evals, adapter stats)
    on_save(state, folder)    a checkpoint (folder "checkpoint") or the best adapter (folder "best") is on disk
    on_end(state)             training is over and the final checkpoint is on disk
Under torchrun on_step / on_eval / on_end run on every rank (a stop must be decided alike on all: base it on
the record, whose losses are global), on_log / on_save on rank 0 only, the one that writes files.
"""
from __future__ import annotations

import csv
import functools
import importlib.util
import logging
import math
import os
from pathlib import Path

from peftcore.analysis.plots import plot_training_curves
from peftcore.training.state import MetricsLog

logger = logging.getLogger(__name__)

EVENTS = ("on_step", "on_eval", "on_log", "on_save", "on_end")
LOG_SINKS = ("csv", "tensorboard")  # what [train] log_to may name
CSV_FILE = "metrics.csv"
TENSORBOARD_DIR = "tensorboard"


# Records written whatever log_every says: evaluations, adapter statistics, AdaLoRA's ranks after a mask step
# (`peftcore inspect` draws the rank history from them)
ALWAYS_LOGGED = ("eval_loss", "adapter_stats", "adalora_ranks")

class Callbacks:
    """The run's callbacks, called in order; an event a callback lacks is skipped."""

    def __init__(self, callbacks=()):
        self.callbacks = list(callbacks)
        for callback in self.callbacks:
            if not any(callable(getattr(callback, event, None)) for event in EVENTS):
                raise TypeError(f"{type(callback).__name__} has none of the callback methods {', '.join(EVENTS)}")

    def fire(self, event: str, *args) -> None:
        for callback in self.callbacks:
            method = getattr(callback, event, None)
            if method is not None:
                method(*args)


class Reporter:
    """Where the loop's records go: metrics.jsonl, the log_to sinks and the progress bar (rank 0), the
    callbacks (their events as the module docstring says). `resume_step`: the checkpoint's step when
    resuming, so the files drop what was logged after it (those steps are logged again)."""

    def __init__(self, config, output_dir: Path, is_main: bool, step: int, resume_step: int | None, callbacks=()):
        self.config, self.output_dir, self.is_main = config, Path(output_dir), is_main
        self.log = MetricsLog(output_dir, resume_step=resume_step) if is_main else None
        sinks = log_sinks(config.log_to, self.output_dir, resume_step) if is_main else []
        self.events = Callbacks([*callbacks, *sinks])
        self.bar = progress_bar(config, step) if is_main else None

    def stepped(self, state, record: dict) -> None:
        """After an optimizer step (record: the step's metrics, eval keys included on an eval step)."""
        self.events.fire("on_step", state, record)
        if "eval_loss" in record:
            self.events.fire("on_eval", state, {k: v for k, v in record.items() if k == "step" or k.startswith("eval")})
        if state.step % self.config.log_every == 0 or any(key in record for key in ALWAYS_LOGGED):
            self.write(state, record)
        update_bar(self.bar, record)

    def evaluated_at_start(self, state, metrics: dict) -> None:
        """The step-0 evaluation (the adapter as initialised): logged and plotted, not a step."""
        record = {"step": 0, **metrics}
        self.events.fire("on_eval", state, record)
        self.write(state, record)

    def write(self, state, record: dict) -> None:
        if self.log is not None:
            self.log.write(record)
            self.events.fire("on_log", state, record)

    def saved(self, state, folder: Path) -> None:
        if self.is_main:
            self.events.fire("on_save", state, folder)

    def ended(self, state) -> None:
        """After the final checkpoint: the bar closed, the pictures drawn, on_end fired."""
        if self.bar is not None:
            self.bar.close()
        if self.log is not None and self.config.plots and plot_training_curves(self.log.records(),
                                                                               self.output_dir) is None:
            warn_no_matplotlib()
        self.events.fire("on_end", state)


def progress_bar(config, initial: int):
    if not config.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=config.max_steps, initial=initial, desc="train", unit="step", dynamic_ncols=True)


def update_bar(bar, record: dict) -> None:
    if bar is None:
        return
    shown = {"loss": f"{record['loss']:.3f}", "lr": f"{record['lr']:.1e}", "tok/s": f"{record['tokens_per_s']:.0f}"}
    if "eval_loss" in record:
        shown["eval"] = f"{record['eval_loss']:.3f}"
    if "skipped_steps" in record:
        shown["skipped"] = str(record["skipped_steps"])
    bar.set_postfix(shown, refresh=False)
    bar.update(1)


@functools.cache  # once per process: a sweep of many runs needs to read it only once
def warn_no_matplotlib() -> None:
    logger.warning("matplotlib is not installed: no curve.png (pip install 'peftcore[plot]')")


def check_log_to(sinks) -> None:
    """ValueError naming an unknown sink, or one whose package is missing (before any model loads)."""
    for sink in sinks:
        if sink not in LOG_SINKS:
            raise ValueError(f"log_to: unknown sink {sink!r}; choose from {', '.join(LOG_SINKS)} "
                             "(metrics.jsonl is always written)")
    if "tensorboard" in sinks and importlib.util.find_spec("tensorboard") is None:
        raise ValueError("log_to 'tensorboard' needs the tensorboard package: pip install 'peftcore[tensorboard]'")


def log_sinks(sinks, output_dir: Path, resume_step: int | None) -> list:
    """The sink objects of `log_to` for a run in output_dir (resume_step: continue the files of that run)."""
    kinds = {"csv": CsvSink, "tensorboard": TensorBoardSink}
    return [kinds[sink](output_dir, resume_step) for sink in sinks]


def scalars(record: dict, prefix: str = "") -> dict[str, float]:
    """The record's numbers, nested tables flattened as "adapter_stats/<layer>/<stat>"; lists and NaN left out."""
    out = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(scalars(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[prefix + key] = value
    return out


class CsvSink:
    """metrics.csv: one row per logged record, a column per top-level number (adapter statistics stay in
    metrics.jsonl: hundreds of columns help nobody). A key that appears later (the first eval) adds a
    column: the file is rewritten with the wider header, so every row always lines up with it."""

    def __init__(self, output_dir: Path, resume_step: int | None):
        self.path = Path(output_dir) / CSV_FILE
        self.rows: list[dict] = []
        if resume_step is not None and self.path.is_file():
            with self.path.open(newline="") as f:
                self.rows = [row for row in csv.DictReader(f) if int(row["step"]) <= resume_step]
        self.columns = list(dict.fromkeys(key for row in self.rows for key in row)) or ["step"]
        self.rewrite()

    def on_log(self, state, record: dict) -> None:
        row = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.rows.append(row)
        new = [key for key in row if key not in self.columns]
        if new:
            self.columns += new
            self.rewrite()
            return
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, self.columns).writerow(row)

    def rewrite(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, self.columns)
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(tmp, self.path)


class TensorBoardSink:
    """Event files under output_dir/tensorboard (`tensorboard --logdir runs/`): every number of a logged
    record at its step, adapter statistics as adapter_stats/<layer>/<stat>. A resumed run purges the events
    after its checkpoint's step, which it logs again."""

    def __init__(self, output_dir: Path, resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package: check_log_to said so

        purge = None if resume_step is None else resume_step + 1
        # flush_secs: the default 120 s leaves a watching TensorBoard minutes behind a CPU run
        self.writer = SummaryWriter(log_dir=str(Path(output_dir) / TENSORBOARD_DIR), purge_step=purge, flush_secs=20)

    def on_log(self, state, record: dict) -> None:
        step = record["step"]
        for key, value in scalars({k: v for k, v in record.items() if k != "step"}).items():
            self.writer.add_scalar(key, value, step)

    def on_end(self, state) -> None:
        self.writer.close()
