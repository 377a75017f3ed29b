"""AdaLoRA through the one training loop (peftcore.training.loop.train) on a tiny peftcore Llama: the rank schedule
runs as a step hook, metrics.jsonl records it on mask steps (budgets checked against HF PEFT's own RankAllocator on
the same model), the saved adapter is pruned, and a run interrupted at a checkpoint and resumed ends where the
uninterrupted one does: the importance EMAs travel in the checkpoint (without them the resumed masks differ).
FSDP's refusal needs torchrun: not tested here."""
import json

import peft
import pytest
import torch
from safetensors import safe_open

from peftcore import get_peft_model
from peftcore.adalora import AdaLoraConfig
from peftcore.adalora.allocator import RankAllocator
from peftcore.models import LlamaConfig, from_config
from peftcore.training.loop import train, train_step
from tests.peftcore.training.test_loop import VOCAB, quiet, rows

STEPS = 8
# masks at 0-based steps 2 and 4 (deltaT 2, after tinit 1), the final one at 6 = 8 - 2, re-applied at 7
SCHEDULE = dict(init_r=4, target_r=2, tinit=1, tfinal=2, deltaT=2, total_step=STEPS)
MASK_STEPS = [2, 4, 6]


def tiny_adalora(seed: int = 0, dropout: float = 0.0):
    torch.manual_seed(seed)
    model = from_config(LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=1))
    return get_peft_model(model, AdaLoraConfig(target_modules=["q_proj", "v_proj", "up_proj"], lora_alpha=8,
                                               lora_dropout=dropout, **SCHEDULE))


def config(**overrides):
    return quiet(**{"max_steps": STEPS, "learning_rate": 3e-2, "batch_size": 4, **overrides})


def records(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("log_every", [1, 3])
def test_train_logs_the_schedule_on_mask_steps_and_saves_a_pruned_adapter(tmp_path, log_every):
    model = tiny_adalora()
    train(model, rows(), [], config(log_every=log_every), tmp_path)
    logged = records(tmp_path)
    masked = [r for r in logged if "adalora_budget" in r]
    assert [r["step"] for r in masked] == [s + 1 for s in MASK_STEPS]  # record steps count from 1
    if log_every == 1:
        assert len(logged) == STEPS and all(r["extra_loss"] > 0 for r in logged)  # the penalty, every step
    theirs = peft.tuners.adalora.layer.RankAllocator(model.base_model.model, model.peft_config["default"], "default")
    assert theirs.init_bgt == 24 and theirs.target_bgt == 12  # PEFT's own allocator, run on our model
    for record in masked:
        budget = theirs.budget_schedule(record["step"] - 1)[0]
        assert record["adalora_budget"] == budget == sum(record["adalora_ranks"].values())
        assert "extra_loss" in record
    assert masked[0]["adalora_budget"] > masked[-1]["adalora_budget"] == 12
    pattern = model.peft_config["default"].rank_pattern
    assert masked[-1]["adalora_ranks"] == {k.removesuffix(".lora_E"): sum(v) for k, v in pattern.items()}
    adapter = tmp_path / "checkpoint" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["rank_pattern"] == pattern
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    assert sum(shape[0] for k, shape in shapes.items() if k.endswith(".lora_E")) == 12
    assert len(shapes) == 18 and not [k for k in shapes if "ranknum" in k]


def interrupted_and_resumed(tmp_path, monkeypatch, load_hook_state: bool = True):
    """A run that crashes in its 6th step (the last checkpoint: step 3), resumed into a scrambled model."""
    calls = {"n": 0}

    def crash_in_step_6(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:
            raise RuntimeError("simulated crash")
        return train_step(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr("peftcore.training.loop.train_step", crash_in_step_6)
        with pytest.raises(RuntimeError, match="simulated crash"):
            train(tiny_adalora(dropout=0.1), rows(), [], config(checkpoint_every=3), tmp_path)
    resumed = tiny_adalora(dropout=0.1)
    with torch.no_grad():  # resuming must restore the adapter from the checkpoint
        for p in resumed.parameters():
            if p.requires_grad:
                p.normal_()
    with monkeypatch.context() as patch:
        if not load_hook_state:
            patch.setattr(RankAllocator, "load_state_dict", lambda self, state: None)
        train(resumed, rows(), [], config(checkpoint_every=3), tmp_path, resume=True)
    return resumed


def test_a_resumed_run_ends_with_the_parameters_and_ranks_of_the_uninterrupted_one(tmp_path, monkeypatch):
    full = tiny_adalora(dropout=0.1)
    train(full, rows(), [], config(checkpoint_every=3), tmp_path / "full")
    resumed = interrupted_and_resumed(tmp_path / "part", monkeypatch)
    assert resumed.peft_config["default"].rank_pattern == full.peft_config["default"].rank_pattern
    for (name, a), (_, b) in zip(full.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(a, b, msg=name)
    part, whole = records(tmp_path / "part"), records(tmp_path / "full")
    assert len(part) == len(whole) == STEPS
    for a, b in zip(part, whole):  # steps 1-3 from before the crash, 4-8 logged again after resuming
        assert {k: a.get(k) for k in ("step", "adalora_budget", "adalora_ranks")} == {
            k: b.get(k) for k in ("step", "adalora_budget", "adalora_ranks")}
        assert (a["loss"], a["extra_loss"]) == pytest.approx((b["loss"], b["extra_loss"]), rel=1e-6)
    forgetful = interrupted_and_resumed(tmp_path / "forgetful", monkeypatch, load_hook_state=False)
    differs = forgetful.peft_config["default"].rank_pattern != full.peft_config["default"].rank_pattern or any(
        not torch.allclose(a, b) for (_, a), (_, b) in zip(full.named_parameters(), forgetful.named_parameters()))
    assert differs  # non-triviality: the EMAs in the checkpoint are what makes the resumed masks the same
