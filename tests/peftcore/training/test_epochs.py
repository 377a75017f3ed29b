"""[train] epochs: a step budget derived from the training rows; and the missing-matplotlib warning."""
import json
import logging
import sys
from collections import Counter
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import peftcore.training.loop as loop
import peftcore.training.reporting as reporting
from peftcore.data.records import IGNORE_INDEX, TokenizedExample
from peftcore.training.config import DEFAULT_MAX_STEPS, TrainConfig, step_budget
from peftcore.training.loop import TrainingError, lr_factor, train, train_step
from peftcore.training.order import step_batches
from peftcore.training.state import TrainState
from tests.peftcore.training.test_loop import quiet, rows, tiny_peft_model


def numbered(n: int, task: str | None = None) -> list[TokenizedExample]:
    """n one-token rows whose token (3, 4, ...) names the row."""
    return [TokenizedExample(f"r:{i}", [3 + i], [3 + i], task=task) for i in range(n)]


def drawn(data: list[TokenizedExample], config: TrainConfig, steps: int, world: int = 1) -> dict:
    """{task: Counter of row tokens} that `steps` optimizer steps draw, summed over the ranks."""
    seen: dict = {}
    for rank in range(world):
        batches = step_batches(data, TrainState(world_size=world), config, 0, rank, world)
        for _ in range(steps):
            for batch in next(batches):
                ids = batch["input_ids"][batch["attention_mask"].bool()].tolist()
                seen.setdefault(batch.get("task"), Counter()).update(i for i in ids if i >= 3)  # 0: a padding batch
    return seen


def test_step_budget_counts_micro_batches_of_the_order():
    data = numbered(12)  # batch_size 5: an epoch is 5 + 5 + 2 rows
    assert step_budget(TrainConfig(max_steps=7), data) == 7
    assert [step_budget(TrainConfig(epochs=e, batch_size=5), data) for e in (1, 2, 0.5, 2.5)] == [3, 6, 2, 8]
    assert step_budget(TrainConfig(epochs=1, batch_size=5, grad_accum=2), data) == 2  # 3 micro-batches
    assert step_budget(TrainConfig(epochs=1, batch_size=2), data, world_size=2) == 3  # 4 rows a micro-batch
    assert step_budget(TrainConfig(epochs=1.1, batch_size=1), numbered(10)) == 11  # not 12 from 11.000000000000002
    tasks = numbered(3, "small") + numbered(9, "large")
    assert step_budget(TrainConfig(epochs=1, batch_size=2), tasks) == 5  # by the largest task: 9 rows
    assert step_budget(TrainConfig(epochs=1, batch_size=2, task_weights={"large": 0.0}), tasks) == 2  # never drawn


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 23), batch_size=st.integers(1, 6), grad_accum=st.integers(1, 3), world=st.integers(1, 3),
       epochs=st.integers(1, 3))
def test_the_budget_is_the_fewest_steps_that_train_every_row_epochs_times(n, batch_size, grad_accum, world, epochs):
    config = TrainConfig(epochs=epochs, batch_size=batch_size, grad_accum=grad_accum)
    data, budget = numbered(n), step_budget(config, numbered(n), world)
    assert min(drawn(data, config, budget, world)[None][3 + i] for i in range(n)) >= epochs
    short = drawn(data, config, budget - 1, world).get(None, Counter())
    assert min(short[3 + i] for i in range(n)) < epochs  # one step fewer leaves a row short


def test_multi_task_epochs_are_passes_over_the_largest_task():
    data, config = numbered(3, "small") + numbered(7, "large"), TrainConfig(epochs=2, batch_size=2)
    seen = drawn(data, config, step_budget(config, data))
    assert set(seen["large"].values()) == {2} and len(seen["large"]) == 7
    assert min(seen["small"].values()) >= 4  # the small task repeats its epochs more often


def test_max_steps_and_epochs_together_are_refused_and_epochs_must_be_positive():
    assert TrainConfig().max_steps == DEFAULT_MAX_STEPS and TrainConfig(epochs=2).max_steps is None
    with pytest.raises(ValueError, match="max_steps=100 and epochs=2 both set: keep one"):
        TrainConfig(max_steps=100, epochs=2)  # the default's value, but written: still ambiguous
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="epochs must be a finite number > 0"):
            TrainConfig(epochs=bad)


class Bar:
    """Records what the progress bar was told."""
    made: list = []

    def __init__(self, total, initial, **kwargs):
        self.total, self.n = total, initial
        Bar.made.append(self)

    def set_postfix(self, *args, **kwargs):
        pass

    def update(self, n):
        self.n += n

    def close(self):
        pass


def test_epochs_drive_the_stopping_the_schedule_and_the_bar(tmp_path, monkeypatch, caplog):
    seen = Counter()

    def recording(model, micro_batches, *args, **kwargs):
        for batch in micro_batches:
            seen.update(tuple(row[mask.bool()].tolist()) for row, mask in zip(batch["input_ids"],
                                                                                batch["attention_mask"]))
        return train_step(model, micro_batches, *args, **kwargs)

    monkeypatch.setattr(loop, "train_step", recording)
    monkeypatch.setattr("tqdm.auto.tqdm", Bar)
    Bar.made.clear()
    config = quiet(epochs=2, batch_size=5, lr_schedule="linear", learning_rate=1e-2, warmup_steps=1, progress=True)
    with caplog.at_level(logging.INFO, logger="peftcore.training"):
        state = train(tiny_peft_model(), rows(), [], config, tmp_path)
    assert state.step == 6 and sorted(seen.values()) == [2] * 12  # 12 rows, each twice
    assert "epochs=2 -> max_steps=6: 12 training rows, batch_size 5 x grad_accum 1 x 1 process(es)" in caplog.text
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    derived = replace(config, epochs=None, max_steps=6)
    assert [r["lr"] for r in records] == pytest.approx([1e-2 * lr_factor(s, derived) for s in range(6)])
    assert [(bar.total, bar.n) for bar in Bar.made] == [(6, 6)]


def test_a_resumed_epochs_run_reaches_the_same_step_and_losses(tmp_path, monkeypatch):
    config = quiet(epochs=2.5, batch_size=5, learning_rate=5e-3, lr_schedule="cosine", warmup_steps=2,
                   checkpoint_every=3)  # 3 micro-batches an epoch: 8 steps
    full = train(tiny_peft_model(dropout=0.1), rows(), [], config, tmp_path / "full")
    calls = {"n": 0}

    def crash_on_step_5(*args, **kwargs):  # the last checkpoint is from step 3
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("simulated crash")
        return train_step(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", crash_on_step_5)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tiny_peft_model(dropout=0.1), rows(), [], config, tmp_path / "part")
    monkeypatch.undo()
    resumed = train(tiny_peft_model(dropout=0.1), rows(), [], config, tmp_path / "part", resume=True)
    losses = lambda p: [json.loads(line)["loss"] for line in (p / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert full.step == resumed.step == 8
    assert losses(tmp_path / "part") == pytest.approx(losses(tmp_path / "full"), rel=1e-6, abs=1e-7)


def test_epochs_without_training_rows_is_a_clear_error(tmp_path):
    with pytest.raises(TrainingError, match="epochs=1 needs training rows"):
        train(tiny_peft_model(), [], [], quiet(epochs=1), tmp_path)


def test_plots_without_matplotlib_warn_once(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    reporting.warn_no_matplotlib.cache_clear()
    data = [TokenizedExample("r", [5, 6], [IGNORE_INDEX, 6])] * 4
    with caplog.at_level(logging.WARNING, logger="peftcore.training"):
        for run in ("a", "b"):
            train(tiny_peft_model(), data, [], quiet(max_steps=1, plots=True), tmp_path / run)
    assert not (tmp_path / "a" / "curve.png").exists()
    warned = [r.getMessage() for r in caplog.records if "matplotlib" in r.getMessage()]
    assert warned == ["matplotlib is not installed: no curve.png (pip install 'peftcore[plot]')"]
    reporting.warn_no_matplotlib.cache_clear()
    with caplog.at_level(logging.WARNING, logger="peftcore.training"):
        train(tiny_peft_model(), data, [], quiet(max_steps=1, plots=False), tmp_path / "off")
    assert len([r for r in caplog.records if "matplotlib" in r.getMessage()]) == 1  # plots off: nothing to miss
    reporting.warn_no_matplotlib.cache_clear()
