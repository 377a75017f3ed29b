"""peftcore.training.order: group_by_length batches rows of similar lengths, every row once an epoch,
and a resumed run continues the same batches."""
import random

from hypothesis import given
from hypothesis import strategies as st

from peftcore.data.records import TokenizedExample
from peftcore.training.config import TrainConfig
from peftcore.training.order import batches_from
from peftcore.training.state import TrainState


def rows_of(lengths: list[int]) -> list[TokenizedExample]:
    return [TokenizedExample(f"r:{i}", [i + 1] * n, [i + 1] * n) for i, n in enumerate(lengths)]


def epoch(rows, config, state=None) -> list[list[int]]:
    """One epoch's batches, each as the row ids it holds (the first token of a row is its id + 1)."""
    state = state or TrainState()
    left = -(-(len(rows) - state.position) // config.batch_size)
    stream = batches_from(rows, state, config, pad_token_id=0)
    return [[int(row[0]) - 1 for row in next(stream)["input_ids"]] for _ in range(left)]


def padding(rows, batches) -> int:
    return sum(max(len(rows[i].input_ids) for i in b) * len(b) - sum(len(rows[i].input_ids) for i in b)
               for b in batches)


def test_grouping_by_length_cuts_padding_and_keeps_every_row_once():
    rng = random.Random(0)
    rows = rows_of([rng.choice([rng.randint(40, 80), rng.randint(180, 340)]) for _ in range(240)])  # bimodal
    plain, grouped = (epoch(rows, TrainConfig(batch_size=8, group_by_length=g)) for g in (False, True))
    assert sorted(i for b in grouped for i in b) == list(range(240))
    assert padding(rows, grouped) < 0.25 * padding(rows, plain)
    assert epoch(rows, TrainConfig(batch_size=8, group_by_length=True, seed=1)) != grouped  # still shuffled
    longest_at = {max(range(len(b)), key=lambda k: max(len(rows[i].input_ids) for i in b[k]))
                  for b in (epoch(rows, TrainConfig(batch_size=8, group_by_length=True, seed=s)) for s in range(4))}
    assert len(longest_at) > 1  # the batches are shuffled too: not every long row first (one language first)


@given(st.lists(st.integers(1, 30), min_size=1, max_size=60), st.integers(1, 7), st.integers(0, 9))
def test_a_resumed_epoch_continues_the_same_grouped_batches(lengths, batch_size, stop):
    rows, config = rows_of(lengths), TrainConfig(batch_size=batch_size, group_by_length=True)
    whole = epoch(rows, config)
    state = TrainState()
    stream = batches_from(rows, state, config, pad_token_id=0)
    for _ in range(min(stop, len(whole) - 1)):
        next(stream)
    resumed = TrainState(epoch=state.epoch, position=state.position)
    assert epoch(rows, config, resumed) == whole[min(stop, len(whole) - 1):]
