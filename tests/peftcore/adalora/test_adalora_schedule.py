"""AdaLoRA's rank schedule against HF PEFT 0.21.2's RankAllocator and AdaLoraModel (pairs.py builds both).

The budget function on a grid of steps; the orthogonality penalty against the value PEFT's AdaLoraModel.forward
adds to the loss; the importance EMAs and triplet scores at the first mask; and 15 training steps (warm-up, four
masks, the final mask, three steps at the final ranks) run side by side in PEFT's documented loop and in ours
three ways (train_step with hooks=, training.hooks by hand, PEFT's update_and_allocate by hand): after every step
every parameter must agree and so must rank_pattern.
"""
import copy
import types
import warnings

import peft
import pytest
import torch
from torch import nn

from peftcore import get_peft_model
from peftcore.adalora import AdaLoraConfig, orthogonal_regularization
from peftcore.adalora.allocator import budget_schedule
from peftcore.training.loop import build_optimizer
from tests.peftcore.adalora.pairs import SCHEDULE, batch, ours_step, pair, strip, train_config, train_pair
from tests.tolerances import TOLERANCES

SCHEDULES = {  # (tinit, tfinal, deltaT, total_step, init_r, target_r)
    "the_training_runs": (2, 4, 2, 15, 4, 2),
    "no_warmup_every_step": (0, 0, 1, 10, 4, 2),
    "long_odd_interval": (5, 3, 3, 40, 6, 1),
}
FINAL = SCHEDULE["total_step"] - SCHEDULE["tfinal"]  # 11: the final mask


@pytest.mark.parametrize("case", SCHEDULES)
def test_budget_schedule_equals_peft_on_every_step(llama_folder, case):
    tinit, tfinal, delta, total, init_r, target_r = SCHEDULES[case]
    hf, ours = pair(llama_folder, tinit=tinit, tfinal=tfinal, deltaT=delta, total_step=total, init_r=init_r,
                    target_r=target_r)
    theirs, mine = hf.base_model.rankallocator, ours.base_model.rankallocator
    assert (mine.init_bgt, mine.target_bgt) == (theirs.init_bgt, theirs.target_bgt) == (6 * init_r, 6 * target_r)
    config = ours.peft_config["default"]
    got = [budget_schedule(config, step, mine.init_bgt, mine.target_bgt) for step in range(total + 3)]
    assert got == [theirs.budget_schedule(step) for step in range(total + 3)]
    budgets = [b for b, _ in got]
    assert budgets[0] == mine.init_bgt and budgets[-1] == mine.target_bgt
    assert len(set(budgets)) > 2 and any(mask for _, mask in got)  # the budget falls in steps, and masks


class Penalised(nn.Module):
    """A model whose own loss is 0, so PEFT's AdaLoraModel.forward returns exactly orth_reg_weight * regu_loss."""

    def __init__(self):
        super().__init__()
        self.q_proj, self.v_proj, self.o_proj = nn.Linear(8, 6), nn.Linear(6, 7), nn.Linear(7, 8)

    def forward(self, x):
        return types.SimpleNamespace(loss=torch.zeros(()), out=self.o_proj(self.v_proj(self.q_proj(x))))


def penalised_pair(weight: float):
    """(PEFT's model, ours) around copies of Penalised, random A and B (init_lora_weights=False)."""
    kwargs = dict(target_modules=["q_proj", "v_proj", "o_proj"], init_r=4, target_r=2, total_step=10,
                  orth_reg_weight=weight, init_lora_weights=False)
    torch.manual_seed(0)
    model = Penalised()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(1)
        hf = peft.get_peft_model(copy.deepcopy(model), peft.AdaLoraConfig(**kwargs))
        torch.manual_seed(1)
        ours = get_peft_model(copy.deepcopy(model), AdaLoraConfig(**kwargs))
    return hf, ours


@pytest.mark.parametrize("weight", [0.5, 0.1])
def test_orthogonality_penalty_equals_what_peft_forward_adds_to_the_loss(weight):
    hf, ours = penalised_pair(weight)
    expected = hf.base_model(torch.ones(2, 8)).loss  # 0 + weight * regu_loss, in PEFT's own forward
    (hook,) = ours.step_hooks()
    mine = hook.extra_loss()
    torch.testing.assert_close(mine, expected, atol=0, rtol=2e-7)  # measured: 1 ulp (see the bit-equal test)
    assert expected > 1.0  # random A, B are far from orthonormal: the penalty is not a constant 0
    assert torch.equal(weight * orthogonal_regularization(ours.base_model.model, "default"), mine)
    mine.backward(), expected.backward()
    hf_params = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        if "lora_A" in name or "lora_B" in name:
            assert p.grad.abs().sum() > 0, name
            torch.testing.assert_close(p.grad, hf_params[name].grad, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("weight", [0.5, 0.1])
def test_orthogonality_penalty_is_bit_equal_to_peft(weight):
    hf, ours = penalised_pair(weight)
    assert torch.equal(ours.step_hooks()[0].extra_loss(), hf.base_model(torch.ones(2, 8)).loss)


def test_orth_reg_weight_zero_adds_nothing(llama_folder):
    _, ours = pair(llama_folder, orth_reg_weight=0.0)
    assert ours.step_hooks()[0].extra_loss() is None


@pytest.mark.parametrize("variant", ["train_step", "hooks", "update_and_allocate"])
def test_fifteen_training_steps_equal_peft_after_every_step(llama_folder, variant):
    hf, ours = pair(llama_folder)
    history = train_pair(hf, ours, variant)
    worst = max(h["diff"] for h in history)
    assert worst <= TOLERANCES[torch.float32]["atol"], worst  # measured: 1.4e-7 (transformers' Llama vs ours)
    for step, h in enumerate(history):
        assert h["ours"] == h["peft"], step  # stripped of ".default": the same triplets kept, every step
    assert history[SCHEDULE["tinit"] + 1]["ours"] is None  # warm-up: nothing masked yet
    final = history[FINAL]["ours"]
    ranks = {k: sum(v) for k, v in final.items()}
    assert sum(ranks.values()) == 12 and min(ranks.values()) < 2 < max(ranks.values())  # target_bgt, uneven
    assert history[4]["ours"] != final  # the budget fell in steps: the first mask kept more
    assert all(h["ours"] == final for h in history[FINAL:])
    if variant != "update_and_allocate":
        masked = [step for step, h in enumerate(history) if h["record"]]
        assert masked == [4, 6, 8, 10, FINAL]
        theirs = hf.base_model.rankallocator
        for step in masked:
            record = history[step]["record"]
            assert record["adalora_budget"] == theirs.budget_schedule(step)[0] == sum(record["adalora_ranks"].values())
            assert record["adalora_ranks"] == {k.removesuffix(".lora_E"): sum(v) for k, v in
                                               history[step]["ours"].items()}


def assert_relatively_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Importance values are ~1e-8 here (|p * grad| smoothed and multiplied): fp32's absolute row would pass
    anything, so compare relative to the tensor's scale (measured: 8e-7)."""
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_importance_emas_and_triplet_scores_equal_peft_at_the_first_mask(llama_folder):
    hf, ours = pair(llama_folder, beta2=0.7)  # beta1 0.85: a swapped pair of EMA factors shows
    train_pair(hf, ours, "train_step", steps=5)  # 0-based steps 0..4: five importance updates, the last one masks
    theirs, mine = hf.base_model.rankallocator, ours.base_model.rankallocator
    assert len(mine.exp_avg_ipt) == len(theirs.exp_avg_ipt) == 18  # A, B, E of six layers
    for key, value in mine.exp_avg_ipt.items():
        assert_relatively_close(value, theirs.exp_avg_ipt[f"{key}.default"])
        assert_relatively_close(mine.exp_avg_unc[key], theirs.exp_avg_unc[f"{key}.default"])
    scores = mine.triplet_scores()
    for key, score in scores.items():  # PEFT's own pieces: _element_score, the A / B means, _combine_ipt
        module = key.removesuffix(".lora_E")
        a = theirs._element_score(f"{module}.lora_A.default").mean(dim=1, keepdim=True)  # (r, 1)
        b = theirs._element_score(f"{module}.lora_B.default").mean(dim=0).view(-1, 1)  # (r, 1)
        expected = theirs._combine_ipt(theirs._element_score(f"{module}.lora_E.default"), torch.cat([a, b], dim=1))
        assert_relatively_close(score, expected)
    everything = torch.cat(list(scores.values()))
    assert everything.min() > 0 and everything.max() > 2 * everything.min()  # scores that rank the triplets


def test_the_final_mask_holds_while_the_optimizer_pushes_the_masked_entries(llama_folder):
    hf, ours = pair(llama_folder)
    train_pair(hf, ours, "train_step")
    pattern = ours.peft_config["default"].rank_pattern
    hf_params = dict(hf.named_parameters())
    b = batch()
    ours.train()
    loss = ours.base_model.model(b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
    loss.backward()
    pushed = 0
    for key, kept in pattern.items():
        name = f"base_model.model.{key}.default"
        E = dict(ours.named_parameters())[name]
        dropped = ~torch.tensor(kept)
        assert torch.equal(E.detach().view(-1)[dropped], torch.zeros(int(dropped.sum())))  # re-applied each step
        assert torch.equal(hf_params[name].detach().view(-1)[dropped], torch.zeros(int(dropped.sum())))
        pushed += int((E.grad.view(-1)[dropped] != 0).sum())
    assert pushed > 0  # the loss would move them: only the re-applied mask keeps them at 0
    assert strip(hf.peft_config["default"].rank_pattern) == pattern
    for module in ours.base_model.model.modules():
        if hasattr(module, "ranknum"):
            assert module.ranknum["default"].item() == SCHEDULE["init_r"]  # the scale stays init_r, as PEFT's


def test_target_r_equal_to_init_r_trains_keeping_every_triplet(llama_folder):
    _, ours = pair(llama_folder, target_r=SCHEDULE["init_r"])
    config = train_config()
    optimizer = build_optimizer(ours, config)
    for step in range(SCHEDULE["total_step"]):
        ours_step(ours, optimizer, config, step, "train_step")
    assert all(all(kept) for kept in ours.peft_config["default"].rank_pattern.values())
