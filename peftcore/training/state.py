"""What training keeps across a stop: checkpoints (atomic), RNG states, the metrics log.

Distributed runs (peftcore.training.distributed) write the same files, from rank 0: the adapter tensors are
replicated on every rank under both ddp and fsdp, so the checkpoint format does not depend on the
strategy. Only `TrainState.world_size` and the RNG states differ: `rng` then holds every rank's
states as {"per_rank": [rank 0's, rank 1's, ...]}, and resuming needs the same world size.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError

from peftcore._json import json_safe
from peftcore.models import safetensors_io
from peftcore.training import distributed

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "trainer_state.pt"
TRAINABLE_FILE = "trainable.safetensors"
# What a failed write raises: OSError (ENOSPC, EIO, a quota), safetensors' own error type, and torch.save's
# RuntimeError, recognised by its words for a full disk (any other RuntimeError is a bug, not a full disk).
WRITE_ERRORS = (OSError, SafetensorError, RuntimeError)
TORCH_SAVE_WRITE_FAILURES = ("PytorchStreamWriter failed writing file", "unexpected pos")


class SaveError(OSError):
    """A checkpoint (or best adapter) that could not be written; the previous one is left whole."""


class DamagedCheckpointError(ValueError):
    """A checkpoint file that cannot be read back (truncated, overwritten, not ours)."""


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    position: int = 0  # rows of this epoch's order already consumed
    best_eval_loss: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    stopped_early: bool = False
    bad_steps: int = 0
    bad_in_a_row: int = 0
    rng: dict = field(default_factory=dict)
    world_size: int = 1  # processes that trained (global batch = world_size x batch_size x grad_accum)
    task_positions: dict = field(default_factory=dict)  # multi-task: {task: [epoch, position]} of its own order


class TaskCursor:
    """One task's place in its own data order, read and written like TrainState's epoch / position but
    kept in state.task_positions (plain lists, so checkpoints load with weights_only=True)."""

    def __init__(self, state: TrainState, task: str):
        self.place = state.task_positions.setdefault(task, [0, 0])

    @property
    def epoch(self) -> int:
        return self.place[0]

    @epoch.setter
    def epoch(self, value: int) -> None:
        self.place[0] = value

    @property
    def position(self) -> int:
        return self.place[1]

    @position.setter
    def position(self, value: int) -> None:
        self.place[1] = value


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def capture_rng() -> dict:
    """Every generator a step may draw from (dropout, augmentation); plain types for weights_only loads."""
    py = random.getstate()
    np_state = np.random.get_state()
    rng = {"torch": torch.get_rng_state(), "python": [py[0], list(py[1]), py[2]],
           "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def restore_rng(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, *rest = rng["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def rng_of_rank(rng: dict, rank: int) -> dict:
    """This rank's states out of a checkpoint's `rng` (one dict, or {"per_rank": [...]})."""
    return rng["per_rank"][rank] if "per_rank" in rng else rng


def replace_atomically(build, target: Path) -> None:
    """Write into `<target>.tmp`, then rename: a crash or a full disk mid-write never leaves a half
    checkpoint, and the previous one stays whole until the new one is."""
    old = recover_replaced(target)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        build(tmp)
    except WRITE_ERRORS as e:
        shutil.rmtree(tmp, ignore_errors=True)  # the partial copy: its space back
        if type(e) is RuntimeError and not any(words in str(e) for words in TORCH_SAVE_WRITE_FAILURES):
            raise
        raise save_failed(target, e) from e
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def save_failed(target: Path, error: Exception) -> SaveError:
    if target.exists():
        then = f"the previous {target.name}/ there is intact: free disk space, then continue with --resume"
    else:
        then = f"no earlier {target.name}/ was saved: free disk space and start the run again"
    return SaveError(f"could not save {target} ({error}); {then}")


def recover_replaced(target: Path) -> Path:
    """A crash between replace_atomically's two renames leaves only `<target>.old`, the last complete
    version: put it back. -> the `.old` path."""
    old = target.with_name(target.name + ".old")
    if old.exists() and not target.exists():
        os.replace(old, target)
    return old


def damaged(path: Path, why) -> DamagedCheckpointError:
    return DamagedCheckpointError(f"{path} is damaged ({why}): this checkpoint cannot be resumed; start over "
                                  "with --overwrite, or in another --output-dir")


def resumable_state(output_dir: Path) -> Path:
    """output_dir's checkpoint trainer_state.pt, checked (cheaply: no tensor is read) to be there and
    whole, so that a run that cannot resume fails before its model loads."""
    folder = Path(output_dir) / CHECKPOINT_DIR
    recover_replaced(folder)
    path = folder / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {folder} (train without --resume first)")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip, its directory last: a truncated file has none
        raise damaged(path, "truncated, or not written by torch.save")
    try:
        safetensors_io.read_header(folder / TRAINABLE_FILE)  # checks every tensor's bytes are in the file
    except (OSError, ValueError) as e:
        raise damaged(folder / TRAINABLE_FILE, e) from None
    return path


class Checkpointer:
    """output_dir/checkpoint: adapter + trainer_state.pt; output_dir/best: the best adapter so far.

    Resuming restores every trainable tensor by name from trainable.safetensors (a P-tuning MLP
    or prefix projection included, which HF PEFT's adapter file leaves out), so it works the same
    for every method.
    """

    def __init__(self, output_dir: Path, model, save_adapter, rank: int = 0, world_size: int = 1, settle=None,
                 hooks=()):
        self.output_dir, self.model, self.save_adapter = Path(output_dir), model, save_adapter
        self.hooks = list(hooks)  # training.hooks: their state (AdaLoRA's importance EMAs) resumes with the run
        self.rank, self.world_size = rank, world_size
        self.settle = settle or (lambda: None)  # run by every rank before rank 0 reads the model

    @property
    def folder(self) -> Path:
        return self.output_dir / CHECKPOINT_DIR

    def save(self, state: TrainState, optimizer, scheduler) -> None:
        """Every rank calls this (the RNG states are gathered); rank 0 writes."""
        self.settle()
        if self.world_size > 1:
            state.rng = {"per_rank": distributed.all_gather_object(capture_rng())}
        else:
            state.rng = capture_rng()
        if self.rank != 0:
            return

        def build(tmp: Path):
            self.save_adapter(tmp / "adapter")
            trainable = {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}
            safetensors_io.write(trainable, tmp / TRAINABLE_FILE)
            payload = {"state": asdict(state), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                       "hooks": [hook.state_dict() for hook in self.hooks]}
            torch.save(payload, tmp / STATE_FILE)

        replace_atomically(build, self.folder)

    def save_best(self) -> None:
        self.settle()
        if self.rank == 0:
            replace_atomically(self.save_adapter, self.output_dir / "best")

    def load(self, optimizer, scheduler) -> TrainState:
        path = resumable_state(self.output_dir)
        try:
            payload = torch.load(path, weights_only=True)
        except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as e:  # the zip, or a pickle in it
            raise damaged(path, e) from None
        saved_world = payload["state"].get("world_size", 1)
        if saved_world != self.world_size:
            raise ValueError(
                f"--resume: the checkpoint in {self.folder} was written by {saved_world} process(es), this run has "
                f"{self.world_size}: resume with the same number (torchrun --nproc-per-node {saved_world}), since the "
                "global batch (world_size x batch_size x grad_accum), the data split and the per-rank RNG states "
                "depend on it; or start a new run in another output dir")
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in safetensors_io.iter_tensors(self.folder / TRAINABLE_FILE):
                if name not in params or params[name].shape != tensor.shape:
                    raise ValueError(
                        f"--resume: checkpoint tensor {name} {tuple(tensor.shape)} does not fit this model")
                params[name].copy_(tensor)
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        for hook, hook_state in zip(self.hooks, payload.get("hooks", [])):
            hook.load_state_dict(hook_state)
        return TrainState(**payload["state"])


def metrics_record(line: str) -> dict | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) and type(record.get("step")) is int else None


class MetricsLog:
    """metrics.jsonl, one line per logged step (its pictures: peftcore.analysis.plots.plot_training_curves)."""

    def __init__(self, output_dir: Path, resume_step: int | None = None):
        """resume_step: continue a run checkpointed at that step; lines logged after it (before the
        interruption) are dropped, since the resumed run logs those steps again."""
        self.path = Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None or not self.path.is_file():
            self.path.write_text("")
            return
        kept = [line for line, record in self.logged() if record["step"] <= resume_step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def logged(self) -> list[tuple[str, dict]]:
        """(line, record) of each logged step. A torn last line (the run was killed mid-write) is dropped:
        its step comes after the checkpoint and is logged again. A bad line before it is an error."""
        lines = [(n, line) for n, line in enumerate(self.path.read_text().splitlines(), start=1) if line.strip()]
        out = []
        for i, (n, line) in enumerate(lines):
            record = metrics_record(line)
            if record is None and i < len(lines) - 1:
                raise ValueError(f"{self.path}:{n}: not a metrics record (a JSON object with an integer \"step\"); "
                                 f"only a torn last line is skipped: fix or delete line {n}, "
                                 f"or start over with --overwrite")
            if record is not None:
                out.append((line, record))
        return out

    def write(self, record: dict) -> None:
        """NaN / inf (a skipped step's loss) are written as null: bare NaN is not JSON (jq, browsers refuse it)."""
        with self.path.open("a") as f:
            f.write(json.dumps(json_safe(record), allow_nan=False) + "\n")

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
