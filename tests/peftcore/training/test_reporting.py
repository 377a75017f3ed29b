"""What a run reports: callbacks (every event, a stop), the step-0 eval, metrics.csv and TensorBoard events, each
checked against metrics.jsonl, the record they must mirror, and across an interrupted + resumed run."""
import csv
import json
import math

import pytest

from peftcore.training import reporting
from peftcore.training.config import TrainConfig
from peftcore.training.loop import train
from tests.peftcore.training.test_loop import quiet, rows, tiny_peft_model


def logged(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


class Recorder:
    """Every event with what it was given; the saved folders checked to be on disk when announced."""

    def __init__(self, stop_at: int | None = None):
        self.events, self.stop_at = [], stop_at

    def on_step(self, state, record):
        self.events.append(("step", record["step"]))
        if record["step"] == self.stop_at:
            state.stopped_early = True

    def on_eval(self, state, metrics):
        self.events.append(("eval", metrics["step"]))

    def on_log(self, state, record):
        self.events.append(("log", record["step"]))

    def on_save(self, state, folder):
        assert (folder / "adapter_config.json").is_file() or (folder / "adapter" / "adapter_config.json").is_file()
        self.events.append(("save", folder.name))

    def on_end(self, state):
        self.events.append(("end", state.step))


def test_callbacks_see_every_step_eval_log_and_save_in_order(tmp_path):
    recorder = Recorder()
    config = quiet(max_steps=4, eval_every=2, log_every=2, threshold=1e9)
    train(tiny_peft_model(), rows(), rows(4, seed=9), config, tmp_path, callbacks=[recorder])
    assert recorder.events == [
        ("eval", 0), ("log", 0),  # the step-0 eval: logged, never a step
        ("step", 1),
        ("save", "best"), ("step", 2), ("eval", 2), ("log", 2),
        ("step", 3),
        ("step", 4), ("eval", 4), ("log", 4),  # step 4 cannot beat step 2 by the threshold: no best saved
        ("save", "checkpoint"), ("end", 4),
    ]
    assert [r["step"] for r in logged(tmp_path)] == [step for event, step in recorder.events if event == "log"]


def test_a_callback_stops_the_run_and_the_final_checkpoint_is_still_written(tmp_path):
    state = train(tiny_peft_model(), rows(), [], quiet(max_steps=50), tmp_path, callbacks=[Recorder(stop_at=3)])
    assert state.step == 3 and (tmp_path / "checkpoint" / "trainer_state.pt").is_file()
    assert [r["step"] for r in logged(tmp_path)] == [1, 2, 3]


def test_the_step_0_eval_is_the_untrained_adapter_and_can_be_turned_off(tmp_path):
    from peftcore.training.loop import evaluate

    model, eval_rows = tiny_peft_model(), rows(4, seed=9)
    untrained = evaluate(model, eval_rows, 4, 0)["eval_loss"]
    train(model, rows(), eval_rows, quiet(max_steps=2, eval_every=2), tmp_path / "on")
    assert logged(tmp_path / "on")[0] == {"step": 0, "eval_loss": pytest.approx(untrained),
                                          "eval_ppl": pytest.approx(math.exp(untrained))}
    train(tiny_peft_model(), rows(), eval_rows, quiet(max_steps=2, eval_every=2, eval_on_start=False), tmp_path / "off")
    assert logged(tmp_path / "off")[0]["step"] == 1


def test_an_object_without_callback_methods_is_refused(tmp_path):
    with pytest.raises(TypeError, match="has none of the callback methods on_step"):
        train(tiny_peft_model(), rows(), [], quiet(max_steps=1), tmp_path, callbacks=[object()])


def read_csv(folder) -> list[dict]:
    with (folder / "metrics.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def test_metrics_csv_mirrors_metrics_jsonl_with_a_column_per_number(tmp_path):
    train(tiny_peft_model(), rows(), rows(4, seed=9), quiet(max_steps=5, eval_every=2, log_to=["csv"]), tmp_path)
    table, records = read_csv(tmp_path), logged(tmp_path)
    assert [int(row["step"]) for row in table] == [r["step"] for r in records] == [0, 1, 2, 3, 4, 5]
    for row, record in zip(table, records):
        assert {k for k, v in row.items() if v != ""} == set(record)  # each row has exactly its record's keys
        for key, value in record.items():
            assert float(row[key]) == pytest.approx(value, rel=1e-12)
    assert list(table[0])[:2] == ["step", "eval_loss"]  # a key seen later became a column of every row


class CrashAfterLogging:
    def on_log(self, state, record):
        if record["step"] == 3:
            raise KeyboardInterrupt  # killed after step 3 was logged, one step past the step-2 checkpoint


@pytest.mark.parametrize("sink", ["csv", "tensorboard"])
def test_a_resumed_run_logs_each_step_once_as_the_uninterrupted_run_does(tmp_path, sink):
    config = quiet(max_steps=5, eval_every=2, checkpoint_every=2, log_to=[sink])
    train(tiny_peft_model(), rows(), rows(4, seed=9), config, tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        train(tiny_peft_model(), rows(), rows(4, seed=9), config, tmp_path / "part", callbacks=[CrashAfterLogging()])
    train(tiny_peft_model(), rows(), rows(4, seed=9), config, tmp_path / "part", resume=True)
    # (exact resume: bit-identical losses; only the measured speed differs between the runs)
    read = read_csv if sink == "csv" else tensorboard_scalars
    part, whole = read(tmp_path / "part"), read(tmp_path / "whole")
    if sink == "csv":
        part, whole = ([{k: v for k, v in row.items() if k != "tokens_per_s"} for row in t] for t in (part, whole))
    else:
        assert [s for s, _ in part.pop("tokens_per_s")] == [s for s, _ in whole.pop("tokens_per_s")] == [1, 2, 3, 4, 5]
    assert part == whole and len(part) > 0


def tensorboard_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder / reporting.TENSORBOARD_DIR), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, round(e.value, 5)) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_holds_every_logged_number_at_its_step(tmp_path):
    train(tiny_peft_model(), rows(), rows(4, seed=9),
          quiet(max_steps=4, eval_every=2, inspect_every=2, log_to=["tensorboard"]), tmp_path)
    scalars, records = tensorboard_scalars(tmp_path), logged(tmp_path)
    assert [step for step, _ in scalars["loss"]] == [1, 2, 3, 4]
    assert scalars["eval_loss"] == [(r["step"], round(r["eval_loss"], 5)) for r in records if "eval_loss" in r]
    stat = "adapter_stats/model.layers.0.self_attn.q_proj/relative_delta"
    assert stat in scalars, sorted(scalars)[:8]
    assert [step for step, _ in scalars[stat]] == [2, 4]


def test_unknown_or_unavailable_sinks_are_refused_when_the_config_is_built(monkeypatch):
    with pytest.raises(ValueError, match="unknown sink 'wandb'; choose from csv, tensorboard"):
        TrainConfig(log_to=["wandb"])
    monkeypatch.setattr(reporting.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"pip install 'peftcore\[tensorboard\]'"):
        TrainConfig(log_to=["tensorboard"])


def test_nested_numbers_flatten_and_lists_and_nan_are_left_out():
    record = {"loss": math.nan, "lr": 1e-3, "adapter_stats": {"q": {"rel_norm": 0.5, "sigma": [1.0, 2.0]}}}
    assert reporting.scalars(record) == {"lr": 1e-3, "adapter_stats/q/rel_norm": 0.5}
