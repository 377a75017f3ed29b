"""Checks every causal model family shares (hypothesis draws the inputs in each family's tests)."""
import torch

from peftcore.models.generate import positions_from_mask
from tests.tolerances import assert_close


@torch.no_grad()
def check_padded_rows_equal_alone(model, rows: list[list[int]], pad_id: int, extra: int) -> None:
    """Left-pad `rows` into one batch (`extra` more pad columns, `pad_id` in the pad slots, whose
    value must not matter): each row's real logits equal the row run alone."""
    total = max(map(len, rows)) + extra
    ids = torch.full((len(rows), total), pad_id)
    mask = torch.zeros(len(rows), total, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, total - len(row):], mask[i, total - len(row):] = torch.tensor(row), 1
    batch = model(ids, attention_mask=mask, position_ids=positions_from_mask(mask))
    for i, row in enumerate(rows):
        assert_close(batch[i, total - len(row):], model(torch.tensor([row]))[0])
