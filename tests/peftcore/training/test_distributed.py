"""Data-parallel training (peftcore.training.distributed) against one process: 2 CPU ranks over gloo.

The workers are this file run as a script (`python tests/peftcore/test_distributed.py WORKER OUT`),
launched by torchrun (`python -m torch.distributed.run --standalone --nproc-per-node 2`) or, for the
failure test, as two plain processes given RANK / WORLD_SIZE / MASTER_* by hand, so a dying rank is
not cleaned up by torchrun's agent: the survivor has to fail on its own. Every launch has a timeout.
"""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))

# E402: these imports follow the sys.path insert above, which the worker run as a script needs
import pytest  # noqa: E402
import torch  # noqa: E402

from peftcore import PeftModel  # noqa: E402
from peftcore.models import safetensors_io  # noqa: E402
from peftcore.training.config import TrainConfig  # noqa: E402
from peftcore.training.loop import train  # noqa: E402
from peftcore.training.order import rank_share  # noqa: E402
from tests.peftcore.multitask.test_model import all_rows, tiny_multitask  # noqa: E402
from tests.peftcore.training.test_loop import rows, tiny_peft_model  # noqa: E402

WORLD = 2
TIMEOUT_S = 120
# 21 rows, global micro-batch 4: each epoch ends with a 1-row micro-batch, so rank 1 runs a padding
# batch there; 5 eval rows split 3 / 2 over the ranks, so rank 1 pads its evaluation too.
N_ROWS, N_EVAL, PER_RANK_BATCH = 21, 5, 2


def config(batch_size, **kw) -> TrainConfig:
    base = dict(max_steps=10, learning_rate=1e-2, batch_size=batch_size, grad_accum=2, lr_schedule="cosine",
                warmup_steps=2, max_grad_norm=0.05, eval_every=5, patience=0, progress=False, seed=3)
    return TrainConfig(**{**base, **kw})


# -- the workers (run as a script) -----------------------------------------------------------------
def worker_equivalence(out: Path) -> None:
    """DDP and FSDP runs of the reference job, then a DDP run with dropout interrupted and resumed."""
    for strategy in ("ddp", "fsdp"):
        train(tiny_peft_model(), rows(N_ROWS), rows(N_EVAL, seed=9), config(PER_RANK_BATCH, strategy=strategy),
              out / strategy)
    train(tiny_multitask(), all_rows(), all_rows(seed=10), config(PER_RANK_BATCH, strategy="fsdp"), out / "multitask")
    train(tiny_multitask(), all_rows(), all_rows(seed=10), config(PER_RANK_BATCH, strategy="ddp"),
          out / "multitask_ddp")
    resumable = dict(strategy="ddp", checkpoint_every=4, eval_every=0)
    train(tiny_peft_model(dropout=0.1), rows(N_ROWS), [], config(PER_RANK_BATCH, **resumable), out / "dropout_full")
    import peftcore.training.loop as loop

    real_step, calls = loop.train_step, {"n": 0}

    def crash_on_step_6(*args, **kwargs):  # both ranks stop after the step-4 checkpoint, mid-run
        calls["n"] += 1
        if calls["n"] == 6:
            raise RuntimeError("simulated crash")
        return real_step(*args, **kwargs)

    loop.train_step = crash_on_step_6
    try:
        train(tiny_peft_model(dropout=0.1), rows(N_ROWS), [], config(PER_RANK_BATCH, **resumable), out / "dropout_part")
    except RuntimeError as e:
        assert "simulated crash" in str(e)
    loop.train_step = real_step
    scrambled = tiny_peft_model(dropout=0.1)
    with torch.no_grad():  # resuming must restore the adapter from the checkpoint
        for p in scrambled.parameters():
            if p.requires_grad:
                p.normal_()
    train(scrambled, rows(N_ROWS), [], config(PER_RANK_BATCH, **resumable), out / "dropout_part", resume=True)


def worker_fail(out: Path) -> None:
    """Rank 1 raises at its third step; rank 0 is then waiting in a collective."""
    import peftcore.training.loop as loop

    real_step, calls = loop.train_step, {"n": 0}

    def rank1_fails(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3 and os.environ["RANK"] == "1":
            raise RuntimeError("rank 1 failed on purpose")
        return real_step(*args, **kwargs)

    loop.train_step = rank1_fails
    train(tiny_peft_model(), rows(N_ROWS), [], config(PER_RANK_BATCH, strategy="ddp", eval_every=0, max_steps=50), out)


WORKERS = {"equivalence": worker_equivalence, "fail": worker_fail}


# -- helpers ---------------------------------------------------------------------------------------------
def losses(folder: Path, key="loss") -> list[float]:
    return [r[key] for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines()) if key in r]


def worker_env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PEFTCORE_DIST_TIMEOUT_S": "30", "PYTHONPATH": str(ROOT)}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return {**env, "CUDA_VISIBLE_DEVICES": ""}  # CPU + gloo, also on a GPU machine


def failed_with(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-6000:]}"


def single_process(tmp_path: Path, name: str, **kw) -> Path:
    """The reference: one process, batch WORLD x PER_RANK_BATCH."""
    folder = tmp_path / name
    train(tiny_peft_model(**kw.pop("model", {})), rows(N_ROWS), kw.pop("eval_rows", rows(N_EVAL, seed=9)),
          config(WORLD * PER_RANK_BATCH, **kw), folder)
    return folder


def assert_same_tensors(a: Path, b: Path, atol: float) -> None:
    left, right = dict(safetensors_io.iter_tensors(a)), dict(safetensors_io.iter_tensors(b))
    assert sorted(left) == sorted(right) and left
    for key in left:
        torch.testing.assert_close(left[key], right[key], atol=atol, rtol=atol, msg=key)


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> Path:
    """One torchrun launch (2 ranks) for the equivalence and resume scenarios: process start-up dominates."""
    out = tmp_path_factory.mktemp("distributed")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}",
               str(Path(__file__).resolve()), "equivalence", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, env=worker_env(), cwd=ROOT)
    assert result.returncode == 0, failed_with(result)
    return out


# -- tests -------------------------------------------------------------------------------------------------
def test_rank_share_splits_every_batch_into_disjoint_contiguous_parts():
    for n in range(0, 9):
        items = list(range(n))
        parts = [rank_share(items, r, 3) for r in range(3)]
        assert sum(parts, []) == items
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


@pytest.mark.parametrize("strategy, tolerance", [("ddp", 1e-5), ("fsdp", 1e-4)])
@pytest.mark.slow
def test_two_ranks_train_exactly_like_one_process_with_the_global_batch(launched, tmp_path, strategy, tolerance):
    reference = single_process(tmp_path, "single")
    parallel = launched / strategy
    ref_losses, par_losses = losses(reference), losses(parallel)
    assert len(par_losses) == len(ref_losses) == 10
    assert par_losses == pytest.approx(ref_losses, abs=tolerance, rel=tolerance)
    assert losses(parallel, "eval_loss") == pytest.approx(losses(reference, "eval_loss"), abs=tolerance, rel=tolerance)
    # the same adapter: the final checkpoint's and the best evaluation's
    adapter = "adapter/adapter_model.safetensors"
    assert_same_tensors(parallel / "checkpoint" / adapter, reference / "checkpoint" / adapter, atol=tolerance)
    assert_same_tensors(parallel / "best" / "adapter_model.safetensors",
                        reference / "best" / "adapter_model.safetensors", atol=tolerance)
    moved = dict(safetensors_io.iter_tensors(parallel / "checkpoint" / adapter))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in moved.items()), "the adapter never moved"
    # ... which a single process loads and runs like the reference model
    base = tiny_peft_model().unload()
    loaded = PeftModel.from_pretrained(base, parallel / "checkpoint" / "adapter")
    expected = PeftModel.from_pretrained(tiny_peft_model().unload(), reference / "checkpoint" / "adapter")
    ids = torch.tensor([r.input_ids[:6] for r in rows(3)])
    torch.testing.assert_close(loaded(ids), expected(ids), atol=tolerance, rtol=tolerance)


@pytest.mark.slow
def test_multitask_training_under_ddp_and_fsdp_equals_one_process_with_the_global_batch(launched, tmp_path):
    """Per-task normalisation with global counts: 2 ranks x batch b == 1 process x batch 2b, per task.
    DDP runs with find_unused_parameters for a model with heads (a task's batch runs one head)."""
    reference = tmp_path / "multitask"
    train(tiny_multitask(), all_rows(), all_rows(seed=10), config(WORLD * PER_RANK_BATCH), reference)
    for run in ("multitask", "multitask_ddp"):
        for key in ("loss", "loss/cls", "loss/gen", "loss/qa", "eval_loss"):
            assert losses(launched / run, key) == pytest.approx(losses(reference, key), abs=1e-4, rel=1e-4), (run, key)
        for name in ("adapter/adapter_model.safetensors", "adapter/task_heads.safetensors"):
            assert_same_tensors(launched / run / "checkpoint" / name, reference / "checkpoint" / name, atol=1e-4)


@pytest.mark.slow
def test_every_rank_resumes_from_the_checkpoint_with_its_own_rng_state(launched):
    """Dropout 0.1: ranks draw different masks; an exact resume needs each rank's own RNG state back."""
    full, part = losses(launched / "dropout_full"), losses(launched / "dropout_part")
    # steps 1-5 were logged before the crash; resuming from step 4 drops step 5's line and logs 5-10 again
    assert len(part) == 10 and part == pytest.approx(full, rel=1e-6, abs=1e-7)
    assert_same_tensors(launched / "dropout_full" / "checkpoint" / "trainable.safetensors",
                        launched / "dropout_part" / "checkpoint" / "trainable.safetensors", atol=1e-7)


@pytest.mark.slow
def test_resuming_with_another_world_size_is_a_clear_error(launched, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(launched / "ddp", run)
    with pytest.raises(ValueError, match=r"written by 2 process\(es\), this run has 1: .*--nproc-per-node 2"):
        train(tiny_peft_model(), rows(N_ROWS), [], config(WORLD * PER_RANK_BATCH), run, resume=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_failing_rank_makes_the_other_exit_with_an_error_instead_of_hanging(tmp_path):
    env = {**worker_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(WORLD)}
    logs = [tmp_path / f"rank{r}.log" for r in range(WORLD)]
    procs = []
    for r in range(WORLD):
        with logs[r].open("w") as log:
            procs.append(subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "fail",
                                           str(tmp_path / "run")],
                                          env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, cwd=ROOT,
                                          stdout=log, stderr=subprocess.STDOUT))
    try:
        procs[1].wait(timeout=TIMEOUT_S)
        rank1_done = time.monotonic()
        procs[0].wait(timeout=TIMEOUT_S)  # the process group's timeout is 30 s (PEFTCORE_DIST_TIMEOUT_S)
        gap = time.monotonic() - rank1_done
    finally:
        for p in procs:
            p.kill()
    text = [log.read_text() for log in logs]
    assert procs[1].returncode != 0 and "rank 1 failed on purpose" in text[1], text[1][-3000:]
    assert procs[0].returncode != 0, text[0][-3000:]
    # its own collective failed
    assert "rank 1 failed on purpose" not in text[0] and "Error" in text[0], text[0][-3000:]
    assert gap < 35, f"rank 0 exited {gap:.0f} s after rank 1"


if __name__ == "__main__":
    torch.set_num_threads(1)
    WORKERS[sys.argv[1]](Path(sys.argv[2]))
