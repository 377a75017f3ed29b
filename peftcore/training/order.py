"""The order rows are trained in: seeded per epoch, resumable, split over ranks, one stream per task.

`step_batches` yields one list of micro-batches per optimizer step. Single-task rows: grad_accum
micro-batches of one seeded order. Multi-task rows (TokenizedExample.task set): grad_accum rounds of
one micro-batch per task, each task walking its own seeded order (so a small task repeats its
epochs more often; the loss weights alone set the mix). The position of every order lives in the
TrainState, so a resumed run draws exactly the batches an uninterrupted one would have.
"""
from __future__ import annotations

import zlib

import torch

from peftcore.data.records import IGNORE_INDEX, TokenizedExample, collate, group_by_task
from peftcore.training.config import TrainConfig
from peftcore.training.state import TaskCursor, TrainState


def task_weight(config: TrainConfig, task: str | None) -> float:
    """A task's loss weight; single-task batches (task None) weigh 1."""
    return 1.0 if task is None else float(config.task_weights.get(task, 1.0))



def padding_batch(rows: list[TokenizedExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """One pad token with nothing to predict: a rank without rows still runs the step's collectives."""
    like = rows[0] if rows else TokenizedExample("", [], [])
    row = TokenizedExample("<padding>", [pad_token_id], [IGNORE_INDEX], task=like.task,
                           label=IGNORE_INDEX if like.label is not None else None,
                           span=(IGNORE_INDEX, IGNORE_INDEX) if like.span is not None else None)
    return collate([row], pad_token_id)


def step_batches(rows: list[TokenizedExample], state: TrainState, config: TrainConfig, pad_token_id: int,
                 rank: int = 0, world_size: int = 1):
    """Endless lists of micro-batches, one list per optimizer step.

    Single-task rows: grad_accum micro-batches of one seeded order. Multi-task rows: grad_accum rounds
    of one micro-batch per task (in order of first appearance; weight-0 tasks left out), each task
    in its own seeded order, its place kept in state.task_positions (see the module docstring)."""
    groups = group_by_task(rows)
    streams = [batches_from(rows, state, config, pad_token_id, rank, world_size)] if not groups else [
        batches_from(task_rows, TaskCursor(state, task), config, pad_token_id, rank, world_size,
                     task_seed(config, task))
        for task, task_rows in groups.items() if task_weight(config, task) > 0]
    while True:
        yield [next(stream) for _ in range(config.grad_accum) for stream in streams]


def task_seed(config: TrainConfig, task: str) -> int:
    """Each task's own order: the run's seed offset by a stable hash of the name (not Python's salted hash)."""
    return config.seed + zlib.crc32(task.encode())


def batches_from(rows: list[TokenizedExample], state: TrainState | TaskCursor, config: TrainConfig, pad_token_id: int,
                 rank: int = 0, world_size: int = 1, seed: int | None = None):
    """Endless micro-batches in a seeded order per epoch; `state` records the position for resume.

    With world_size ranks a micro-batch takes the next world_size x batch_size rows of the order
    (what one process with that batch size would take) and this rank gets its contiguous part."""
    seed = config.seed if seed is None else seed
    while True:
        generator = torch.Generator().manual_seed(seed + state.epoch)
        order = torch.randperm(len(rows), generator=generator).tolist()
        if config.group_by_length:
            order = length_grouped(order, rows, config.batch_size * world_size, generator)
        while state.position < len(order):
            chosen = order[state.position : state.position + config.batch_size * world_size]
            state.position += config.batch_size * world_size
            mine = rank_share(chosen, rank, world_size)
            yield collate([rows[i] for i in mine], pad_token_id) if mine else padding_batch(rows, pad_token_id)
        state.epoch, state.position = state.epoch + 1, 0


MEGABATCH = 50  # batches per sorted run, as transformers' LengthGroupedSampler


def length_grouped(order: list[int], rows: list[TokenizedExample], batch: int, generator: torch.Generator) -> list[int]:
    """The shuffled order cut into megabatches of MEGABATCH x batch rows, each sorted by length into
    batches, and the batches of a megabatch shuffled: similar lengths within a batch, but not every
    long batch first (on a 240-row dataset one megabatch is the whole epoch, and sorted batches trained
    all the long Japanese rows, then all the short English ones: eval perplexity 3.32 against 2.68
    unsorted). A function of the epoch's seed alone, so a resumed run continues the same batches."""
    size, out = MEGABATCH * batch, []
    for start in range(0, len(order), size):
        run = sorted(order[start : start + size], key=lambda i: -len(rows[i].input_ids))
        full = len(run) // batch  # a short last batch stays last: batches_from cuts the order every `batch` rows
        out += [i for k in torch.randperm(full, generator=generator).tolist() for i in run[k * batch : (k + 1) * batch]]
        out += run[full * batch :]
    return out


def rank_share(items: list, rank: int, world_size: int) -> list:
    """The rank-th of world_size contiguous, nearly equal parts (the first parts get the remainder)."""
    size, extra = divmod(len(items), world_size)
    start = rank * size + min(rank, extra)
    return items[start : start + size + (rank < extra)]
