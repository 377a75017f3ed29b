"""`peftcore train` when something goes wrong: an occupied run folder, a resume without (or with
another) recipe, a full disk, a run that stays NaN, a damaged checkpoint or metrics log, impossible
numbers, a rank killed under torchrun. Each ends in one `peftcore train: error:` line, and nothing the
user had is lost. The killed-rank test runs this file as a script (`python test_run_faults.py OUT`)."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
TINY_RECIPE = ROOT / "examples" / "support_lora.toml"  # the built-in tiny model (the default job: SmolLM2)
if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors import SafetensorError  # noqa: E402

from peftcore.cli import main  # noqa: E402
from peftcore.jobs.adapter_folder import load_adapter_folder  # noqa: E402
from peftcore.jobs.recipe import load_recipe  # noqa: E402
from peftcore.jobs.run_folder import RunFolderError, check_same_recipe, recipe_for  # noqa: E402
from peftcore.models import safetensors_io  # noqa: E402
from peftcore.training.state import MetricsLog  # noqa: E402
from tests.peftcore.jobs.test_train import FAST, TINY, builtin_replaced_by, run, tiny_builtin  # noqa: E402,F401 (fixture)

QUICK = [*FAST, "--set", "eval.samples=0", "--set", "train.progress=false"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 2-step run with a LoRA rank of 4: the default recipe (rank 8) cannot resume it."""
    folder = tmp_path_factory.mktemp("finished")
    code, _, err = run("train", TINY_RECIPE, "--output-dir", folder, "--max-steps", 2, *QUICK, "--set", "adapter.r=4")
    assert code == 0, err
    return folder


@pytest.fixture
def run_dir(finished, tmp_path) -> Path:
    shutil.copytree(finished, tmp_path / "run")
    return tmp_path / "run"


@pytest.fixture
def no_model(monkeypatch):
    """The error must come before any model (or tokenizer) loads."""
    monkeypatch.setattr("peftcore.jobs.train.resolve_base", lambda *a, **k: pytest.fail("a model was loaded"))


def error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("peftcore train: error: "), err[-3000:]
    return lines[0]


def steps_of(folder: Path) -> int:
    return json.loads((folder / "summary.json").read_text())["steps"]


# -- 1. an occupied output folder ----------------------------------------------------------------------
def test_a_finished_run_is_not_replaced_and_the_users_files_survive(run_dir, no_model):
    shutil.rmtree(run_dir / "checkpoint")  # a finished run, tidied: its adapter/ and logs
    (run_dir / "adapter" / "NOTES.md").write_text("mine")
    weights = (run_dir / "adapter" / "adapter_model.safetensors").read_bytes()
    code, _, err = run("train", TINY_RECIPE, "--output-dir", run_dir, "--max-steps", 1, *QUICK)
    assert code == 2
    line = error_line(err)
    assert f"{run_dir} is not empty (adapter, " in line and "--resume" in line and "--overwrite" in line
    assert (run_dir / "adapter" / "NOTES.md").read_text() == "mine"
    assert (run_dir / "adapter" / "adapter_model.safetensors").read_bytes() == weights


def test_overwrite_starts_a_new_run_and_keeps_files_that_are_not_the_runs(run_dir):
    (run_dir / "notes.txt").write_text("mine")
    code, _, err = run("train", TINY_RECIPE, "--output-dir", run_dir, "--overwrite", "--max-steps", 1, *QUICK,
                       "--set", "train.eval_every=0")
    assert code == 0, err
    assert steps_of(run_dir) == 1 and len((run_dir / "metrics.jsonl").read_text().splitlines()) == 1
    assert not (run_dir / "best").exists()  # the old run's best adapter would have been kept as the result
    assert json.loads((run_dir / "recipe.json").read_text())["adapter"]["r"] == 8  # this run's recipe (the old: 4)
    assert (run_dir / "notes.txt").read_text() == "mine"


def test_resume_and_overwrite_together_are_a_usage_error(run_dir, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--output-dir", str(run_dir), "--resume", "--overwrite"])
    assert e.value.code == 2 and "argument --overwrite: not allowed with argument --resume" in capsys.readouterr().err


# -- 2. --resume reads the run's own recipe --------------------------------------------------------------
@pytest.mark.parametrize("given", [[], [ROOT / "examples" / "support_lora.toml", *QUICK, "--set", "adapter.r=4"]],
                         ids=["no recipe", "the same recipe"])
def test_resume_continues_with_the_runs_recipe_and_a_new_step_budget(run_dir, given):
    saved = (run_dir / "recipe.json").read_bytes()
    code, out, err = run("train", *given[:1], "--resume", "--output-dir", run_dir, "--max-steps", 3, *given[1:])
    assert code == 0, err
    assert steps_of(run_dir) == 3
    assert (run_dir / "recipe.json").read_bytes() == saved  # never rewritten
    if not given:
        assert f"recipe: {run_dir / 'recipe.json'}; run folder: {run_dir}" in out


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "examples").glob("*.toml")))
def test_every_example_recipe_reads_back_from_its_recipe_json(tmp_path, name):
    """What --resume reads without a recipe: the same recipe, and check_same_recipe finds no difference."""
    recipe = load_recipe(ROOT / "examples" / name)
    (tmp_path / "recipe.json").write_text(json.dumps({**recipe.to_dict(), "labels": None}))
    again = recipe_for(None, tmp_path, [])
    assert again.to_dict() == recipe.to_dict()
    check_same_recipe(again, tmp_path)
    with pytest.raises(RunFolderError, match=r" in train\.seed; "):
        check_same_recipe(recipe_for(None, tmp_path, ["train.seed=12345", "train.max_steps=7"]), tmp_path)


def test_resume_refuses_another_recipe_naming_what_differs(run_dir, no_model):
    saved = (run_dir / "recipe.json").read_bytes()
    code, _, err = run("train", ROOT / "examples" / "support_lora.toml", "--resume", "--output-dir", run_dir,
                       "--max-steps", 5, *QUICK, "--set", "train.learning_rate=1e-3")
    assert code == 2
    line = error_line(err)
    assert f"this recipe differs from the one {run_dir} was trained with" in line
    assert " in adapter.r, train.learning_rate; " in line  # not train.max_steps: a new budget is allowed
    assert (run_dir / "recipe.json").read_bytes() == saved


def test_resume_without_recipe_json_asks_for_the_recipe(run_dir, no_model):
    (run_dir / "recipe.json").unlink()
    code, _, err = run("train", "--resume", "--output-dir", run_dir)
    assert code == 2 and f"{run_dir / 'recipe.json'} does not exist" in error_line(err)


# -- 3. failures the user sees as one line ------------------------------------------------------------------
FULL_DISK = [SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                             '"No space left on device" })'),
             OSError(errno.ENOSPC, "No space left on device")]


@pytest.mark.parametrize("error", FULL_DISK, ids=["safetensors", "OSError"])
def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch, error):
    real_write, checkpoints = safetensors_io.write, []

    def disk_fills_in_the_second_checkpoint(tensors, path):
        if Path(path).parent.name == "checkpoint.tmp":
            checkpoints.append(path)
            if len(checkpoints) == 2:  # its adapter is written already: half a checkpoint
                Path(path).write_bytes(b"\0" * 64)
                raise error
        real_write(tensors, path)

    monkeypatch.setattr(safetensors_io, "write", disk_fills_in_the_second_checkpoint)
    folder = tmp_path / "run"
    code, _, err = run("train", TINY_RECIPE, "--output-dir", folder, "--max-steps", 4, *QUICK,
                       "--set", "train.checkpoint_every=2",
                       "--set", "train.eval_every=0")
    assert code == 1
    line = error_line(err)
    assert f"could not save {folder / 'checkpoint'} (" in line and "No space left on device" in line
    assert "the previous checkpoint/ there is intact: free disk space, then continue with --resume" in line
    assert not (folder / "checkpoint.tmp").exists()
    state = torch.load(folder / "checkpoint" / "trainer_state.pt", weights_only=True)
    assert state["state"]["step"] == 2
    load_adapter_folder(folder / "checkpoint" / "adapter")
    monkeypatch.undo()
    code, _, err = run("train", "--resume", "--output-dir", folder)
    assert code == 0, err
    assert steps_of(folder) == 4


def test_a_run_that_stays_nan_ends_in_one_error_line(tmp_path, monkeypatch):
    import peftcore.training.loop as loop

    real_loss = loop.loss_sum

    def nan_loss(*args, **kwargs):
        loss, targets, tokens = real_loss(*args, **kwargs)
        return loss * float("nan"), targets, tokens

    monkeypatch.setattr(loop, "loss_sum", nan_loss)
    code, _, err = run("train", TINY_RECIPE, "--output-dir", tmp_path / "run", "--max-steps", 5, *QUICK,
                       "--set", "train.max_bad_steps=2")
    assert code == 1
    assert error_line(err) == ("peftcore train: error: loss or gradients were NaN/inf for 2 steps in a row (step 2); "
                               "lower the learning rate, use fp32 or bf16 instead of fp16, or check the data")


@pytest.mark.parametrize("file", ["trainer_state.pt", "trainable.safetensors"])
def test_a_truncated_checkpoint_is_named_as_damaged_before_the_model_loads(run_dir, no_model, file):
    path = run_dir / "checkpoint" / file
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    code, _, err = run("train", "--resume", "--output-dir", run_dir, "--max-steps", 3)
    assert code == 1
    line = error_line(err)
    assert f"{path} is damaged (" in line
    assert line.endswith("this checkpoint cannot be resumed; start over with --overwrite, or in another --output-dir")


def test_a_checkpoint_damaged_inside_is_named_too(run_dir):
    """A whole zip with a bad pickle (what the cheap check before loading cannot see): torch.load's error."""
    import zipfile

    path = run_dir / "checkpoint" / "trainer_state.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", b"not a pickle")
    code, _, err = run("train", "--resume", "--output-dir", run_dir, "--max-steps", 3)
    assert code == 1 and f"{path} is damaged (" in error_line(err)


# -- 4. a torn metrics.jsonl --------------------------------------------------------------------------------
def metrics(folder: Path, text: str) -> Path:
    (folder / "metrics.jsonl").write_text(text)
    return folder


LINES = "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3))


def test_a_torn_last_metrics_line_is_dropped_on_resume(tmp_path):
    log = MetricsLog(metrics(tmp_path, LINES + '{"step": 4, "lo'), resume_step=3)
    assert [r["step"] for r in log.records()] == [1, 2, 3]
    assert (tmp_path / "metrics.jsonl").read_text() == LINES


@pytest.mark.parametrize("bad", ["garbage", '{"loss": 1.0}', "[1, 2]"])
def test_a_bad_metrics_line_before_the_last_names_file_and_line(tmp_path, bad):
    lines = LINES.splitlines()
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: not a metrics record .*fix or delete line 2"):
        MetricsLog(metrics(tmp_path, f"{lines[0]}\n{bad}\n{lines[2]}\n"), resume_step=3)


def test_resume_after_a_crash_mid_log_line(run_dir):
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "loss": 2.')
    code, _, err = run("train", "--resume", "--output-dir", run_dir, "--max-steps", 3)
    assert code == 0, err
    # step 0: the eval before the first step (eval_every=2 in FAST); the torn step 3 is logged once, whole
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2, 3]


# -- 5. impossible numbers, refused with the recipe key before the model loads -------------------------
@pytest.mark.parametrize("setting, message", [
    ("train.learning_rate=-1e-4", "[train] learning_rate must be a finite number > 0, got -0.0001"),
    ("adapter.lora_alpha=0", "[adapter] lora_alpha must be a finite number > 0, got 0.0"),
])
# the default recipe: the numbers fail before its model (SmolLM2) would load
def test_an_impossible_number_exits_2_before_the_model_loads(tmp_path, no_model, setting, message):
    code, _, err = run("train", "--output-dir", tmp_path / "run", "--set", setting)
    assert code == 2
    assert error_line(err) == f"peftcore train: error: (default recipe) (with --set {setting}): {message}"


# -- 3d. a rank killed under torchrun ------------------------------------------------------------------------
def worker(out: Path) -> None:
    """`peftcore train` on rank RANK of 2; rank 1 is killed (SIGKILL: no traceback, no goodbye) at its 3rd step."""
    import peftcore.training.loop as loop

    real_step, calls = loop.train_step, {"n": 0}

    def rank1_is_killed(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3 and os.environ["RANK"] == "1":
            os.kill(os.getpid(), signal.SIGKILL)
        return real_step(*args, **kwargs)

    loop.train_step = rank1_is_killed
    with builtin_replaced_by(TINY, Path(os.environ["PEFTCORE_CACHE"])):
        sys.exit(main(["train", str(TINY_RECIPE), "--output-dir", str(out), "--max-steps", "50", *map(str, QUICK),
                       "--set", "train.eval_every=0"]))


@pytest.mark.slow
def test_a_killed_rank_leaves_one_error_line_on_the_survivor(tmp_path):
    from peftcore.jobs import builtin
    from tests.peftcore.training.test_distributed import TIMEOUT_S, WORLD, free_port, worker_env

    builtin.ensure_builtin("tiny-llama")  # built once, here, not raced by two ranks
    env = {**worker_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(WORLD)}
    logs = [tmp_path / f"rank{r}.log" for r in range(WORLD)]
    procs = []
    for r, log in enumerate(logs):
        with log.open("w") as f:
            procs.append(subprocess.Popen([sys.executable, str(Path(__file__).resolve()), str(tmp_path / "run")],
                                          env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, cwd=ROOT,
                                          stdout=subprocess.DEVNULL, stderr=f))
    try:
        procs[1].wait(timeout=TIMEOUT_S)
        started = time.monotonic()
        procs[0].wait(timeout=TIMEOUT_S)
        assert time.monotonic() - started < 35  # the process group's timeout is 30 s (PEFTCORE_DIST_TIMEOUT_S)
    finally:
        for p in procs:
            p.kill()
    assert procs[1].returncode == -signal.SIGKILL
    survivor = logs[0].read_text()
    assert procs[0].returncode == 1 and "Traceback" not in survivor, survivor[-3000:]
    line = error_line(survivor)
    assert line.startswith("peftcore train: error: rank 0: a collective operation failed (")
    assert "another process of this launch most likely died" in line


if __name__ == "__main__":
    torch.set_num_threads(1)
    worker(Path(sys.argv[1]))
