import json
import math
import os
from pathlib import Path

import pytest
import torch

from peftcore import LoraConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model
from peftcore.data.records import IGNORE_INDEX, TokenizedExample, collate
from peftcore.models import LlamaConfig, from_config, quantize_model
from peftcore.training.config import TrainConfig
from peftcore.training.loop import TrainingError, build_optimizer, loss_sum, lr_factor, note_eval, train, train_step
from peftcore.training.state import TrainState

VOCAB = 40


def tiny_peft_model(seed=0, dropout=0.0, targets=("q_proj", "v_proj")):
    torch.manual_seed(seed)
    model = from_config(LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=1))
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), lora_dropout=dropout))


def rows(n=12, seed=1):
    """A learnable task: the answer repeats the prompt; only the answer half is trained."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        prompt = torch.randint(3, VOCAB, (4 + i % 3,), generator=g).tolist()
        ids = prompt + prompt
        out.append(TokenizedExample(f"t:{i}", ids, [IGNORE_INDEX] * len(prompt) + prompt))
    return out


def quiet(**kw):
    return TrainConfig(**{"progress": False, "plots": False, "eval_every": 0, "lr_schedule": "constant", **kw})


def test_loss_decreases_on_a_tiny_run(tmp_path):
    # A random model's lm_head (std 0.02) caps its logits near 0.3: adapt the head too so it can learn.
    model = tiny_peft_model(targets=("q_proj", "v_proj", "lm_head"))
    answer = [5, 6, 7, 8, 9]  # every prompt gets the same answer: learnable in a few steps
    data = [TokenizedExample(r.where, r.input_ids[:4] + answer, [IGNORE_INDEX] * 4 + answer) for r in rows()]
    train(model, data, [], quiet(max_steps=30, learning_rate=3e-2, batch_size=4), tmp_path)
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path, monkeypatch):
    config = TrainConfig(max_steps=8, learning_rate=5e-3, batch_size=5, lr_schedule="cosine", warmup_steps=2,
                         checkpoint_every=3, progress=False, eval_every=0)
    full = tiny_peft_model(dropout=0.1)
    train(full, rows(), [], config, tmp_path / "full")
    calls = {"n": 0}

    def crash_on_step_5(*args, **kwargs):  # a crash mid-run: the last checkpoint is from step 3
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("simulated crash")
        return train_step(*args, **kwargs)

    monkeypatch.setattr("peftcore.training.loop.train_step", crash_on_step_5)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tiny_peft_model(dropout=0.1), rows(), [], config, tmp_path / "part")
    monkeypatch.undo()
    resumed = tiny_peft_model(dropout=0.1)
    with torch.no_grad():  # scramble the adapter: resuming must restore it from the checkpoint
        for p in resumed.parameters():
            if p.requires_grad:
                p.normal_()
    train(resumed, rows(), [], config, tmp_path / "part", resume=True)
    read = lambda p: [r["loss"] for r in map(json.loads, (p / "metrics.jsonl").read_text().splitlines())]  # noqa: E731
    part = read(tmp_path / "part")
    # steps 1-4 were logged before the crash; resuming from step 3 drops step 4's line and logs 4-8 again
    assert part == pytest.approx(read(tmp_path / "full"), rel=1e-6, abs=1e-7) and len(part) == 8
    for (n, a), (_, b) in zip(full.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(a, b, msg=n)


def test_gradient_accumulation_equals_one_big_batch():
    data = rows(8)
    big, small = tiny_peft_model(), tiny_peft_model()
    cfg = quiet(learning_rate=1e-2, max_steps=1)
    train_step(big, [collate(data, 0)], build_optimizer(big, cfg), cfg)
    train_step(small, [collate(data[i : i + 2], 0) for i in range(0, 8, 2)], build_optimizer(small, cfg), cfg)
    changed = False
    for (name, a), (_, b) in zip(big.named_parameters(), small.named_parameters()):
        torch.testing.assert_close(a, b, msg=name, atol=1e-6, rtol=1e-5)
        changed |= a.requires_grad and "lora_B" in name and bool(a.abs().sum() > 0)
    assert changed, "the step did not move the adapter: the comparison proves nothing"


def test_early_stopping_stops_after_patience_evals_without_improvement(tmp_path):
    model = tiny_peft_model()
    # lr 0: eval loss never improves after the first eval, so the run stops at eval #1 + patience;
    # the step-0 eval (eval_on_start) is logged but neither the best nor counted against patience.
    state = train(model, rows(), rows(4, seed=9), quiet(max_steps=50, learning_rate=0.0, batch_size=4,
                                                         eval_every=2, patience=3, threshold=0.01), tmp_path)
    assert state.stopped_early and state.step == 2 * (1 + 3)
    assert state.best_step == 2 and (tmp_path / "best" / "adapter_config.json").is_file()
    evals = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 2, 4, 6, 8] and "loss" not in evals[0]
    assert all(math.isclose(r["eval_ppl"], math.exp(r["eval_loss"])) for r in evals)


def test_nan_steps_are_skipped_then_training_stops_with_a_clear_error(tmp_path):
    model = tiny_peft_model()
    with torch.no_grad():
        model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.fill_(float("nan"))
    before = model.model.model.layers[0].self_attn.v_proj.lora_B["default"].weight.clone()
    with pytest.raises(TrainingError, match="NaN/inf for 3 steps in a row"):
        train(model, rows(), [], quiet(max_steps=10, max_bad_steps=3), tmp_path)
    torch.testing.assert_close(model.model.model.layers[0].self_attn.v_proj.lora_B["default"].weight, before)


def test_lr_schedules_and_weight_decay_groups():
    cfg = TrainConfig(max_steps=10, warmup_steps=2, lr_schedule="linear")
    assert [round(lr_factor(s, cfg), 3) for s in (0, 1, 2, 6, 10)] == [0.333, 0.667, 1.0, 0.5, 0.0]
    cosine = TrainConfig(max_steps=4, lr_schedule="cosine")
    assert lr_factor(2, cosine) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="exp")
    model = tiny_peft_model()
    groups = build_optimizer(model, TrainConfig(weight_decay=0.1)).param_groups
    assert groups[0]["weight_decay"] == 0.1 and all(p.ndim == 2 for p in groups[0]["params"])


def test_no_trainable_parameters_is_a_clear_error():
    model = from_config(LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                    num_attention_heads=2))
    model.requires_grad_(False)
    with pytest.raises(TrainingError, match="no trainable parameters"):
        build_optimizer(model, TrainConfig())


@pytest.mark.parametrize("config", [
    LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
    PromptEncoderConfig(num_virtual_tokens=3, encoder_hidden_size=8, task_type="CAUSAL_LM"),
    PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
], ids=lambda c: type(c).__name__)
def test_fused_loss_equals_the_loss_from_logits(config):
    """loss_sum takes the model's fused labels= path; it must score exactly the targets the logits
    path scores (for prompt methods: not the virtual positions, not the first real token)."""
    torch.manual_seed(0)
    model = get_peft_model(from_config(LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=24,
                                                   num_hidden_layers=2, num_attention_heads=2)), config)
    batch = collate(rows(3), pad_token_id=0)
    batch["labels"][:, 0] = batch["input_ids"][:, 0]  # a trained first token must still not count
    fused, targets, tokens = loss_sum(model, batch)
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])
    labels = batch["labels"][:, 1:].flatten()
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels, ignore_index=IGNORE_INDEX,
                                                 reduction="sum")
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)
    assert targets == int((labels != IGNORE_INDEX).sum()) and tokens == int(batch["attention_mask"].sum())
    fused.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("plots", [True, False])
def test_the_loss_curve_is_drawn_unless_plots_is_off(tmp_path, plots):
    pytest.importorskip("matplotlib")
    train(tiny_peft_model(), rows(), rows(4, seed=5), quiet(max_steps=2, eval_every=1, plots=plots), tmp_path)
    assert (tmp_path / "curve.png").exists() == plots
    assert not (tmp_path / "adapter_norms.png").exists()  # only with inspect_every


def test_bf16_autocast_trains_fp32_adapters_on_cpu(tmp_path):
    """mixed_precision="bf16": the step's matmuls run in bf16 (seen by a hook), the adapter weights
    and their gradients stay fp32, and the loss still falls."""
    model = tiny_peft_model(targets=("q_proj", "v_proj", "lm_head"))
    seen = []
    o_proj = model.model.model.layers[0].self_attn.o_proj
    hook = o_proj.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    for precision in ("no", "bf16"):
        config = quiet(mixed_precision=precision, learning_rate=1e-2)
        train_step(model, [collate(rows(4), 0)], build_optimizer(model, config), config)
    hook.remove()
    assert seen == [torch.float32, torch.bfloat16]
    trained = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == p.grad.dtype == torch.float32 for p in trained)
    train(model, rows(), [], quiet(max_steps=20, learning_rate=3e-2, batch_size=4, mixed_precision="bf16"), tmp_path)
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())]
    assert all(map(math.isfinite, losses)) and sum(losses[-5:]) < 0.8 * sum(losses[:5])


def test_fp16_without_cuda_is_a_clear_error(tmp_path):
    with pytest.raises(TrainingError, match="mixed_precision 'fp16' needs a CUDA device \\(the model is on cpu\\)"):
        train(tiny_peft_model(), rows(), [], quiet(max_steps=1, mixed_precision="fp16"), tmp_path)


@pytest.mark.parametrize("setting, message", [
    ({"learning_rate": -1e-3}, "learning_rate must be a finite number >= 0, got -0.001"),
    ({"log_every": 0}, "log_every must be >= 1, got 0"),  # would divide by zero at the first step
    ({"max_grad_norm": -1.0}, r"max_grad_norm must be a finite number >= 0 \(0: no clipping\), got -1.0"),
])
def test_a_config_that_cannot_train_is_refused_before_any_step(setting, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**setting)


def test_a_crash_between_the_checkpoint_renames_resumes_from_the_last_complete_one(tmp_path, monkeypatch):
    """replace_atomically renames checkpoint -> checkpoint.old, then checkpoint.tmp -> checkpoint: a
    crash between the two leaves only .old (step 2 here), which --resume finds and continues from."""
    real_replace = os.replace

    def crash_on_the_second_rename(src, dst):
        if Path(src).name == "checkpoint.tmp" and (tmp_path / "checkpoint.old").exists():
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr("peftcore.training.state.os.replace", crash_on_the_second_rename)
    config = quiet(max_steps=4, checkpoint_every=2, learning_rate=1e-2, batch_size=4)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_peft_model(), rows(), [], config, tmp_path)
    monkeypatch.undo()
    assert not (tmp_path / "checkpoint").exists() and (tmp_path / "checkpoint.old").is_dir()
    train(tiny_peft_model(), rows(), [], config, tmp_path, resume=True)
    steps = [r["step"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())]
    assert steps == [1, 2, 3, 4]  # step 4's first line dropped; 3 and 4 trained again from step 2
    assert (tmp_path / "checkpoint").is_dir() and not (tmp_path / "checkpoint.old").exists()
    uninterrupted = tmp_path / "uninterrupted"
    train(tiny_peft_model(), rows(), [], config, uninterrupted)
    losses = lambda p: [r["loss"] for r in map(json.loads, (p / "metrics.jsonl").read_text().splitlines())]  # noqa: E731
    assert losses(tmp_path) == pytest.approx(losses(uninterrupted), rel=1e-6)


def test_a_nan_step_is_skipped_counted_and_training_goes_on(tmp_path, monkeypatch):
    import peftcore.training.loop as train_module

    real_loss_sum, calls = train_module.loss_sum, {"n": 0}

    def nan_on_the_second_step(model, batch):
        calls["n"] += 1
        loss, targets, tokens = real_loss_sum(model, batch)
        return (loss * float("nan") if calls["n"] == 2 else loss), targets, tokens

    monkeypatch.setattr(train_module, "loss_sum", nan_on_the_second_step)
    model = tiny_peft_model(targets=("q_proj", "v_proj", "lm_head"))
    state = train(model, rows(), [], quiet(max_steps=4, learning_rate=1e-2, batch_size=4, plots=True), tmp_path)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert "NaN" not in "".join(lines)  # strict JSON: the skipped step's loss is null
    records = [json.loads(line) for line in lines]
    assert [r.get("skipped_steps") for r in records] == [None, 1, None, None] and records[1]["loss"] is None
    assert state.step == 4 and state.bad_steps == 1 and all(math.isfinite(r["loss"]) for r in records[2:])
    pytest.importorskip("matplotlib")
    assert (tmp_path / "curve.png").stat().st_size > 0  # a gap where the skipped step is


def test_gradients_are_clipped_to_max_grad_norm_and_the_norm_before_is_reported():
    model = tiny_peft_model(targets=("q_proj", "v_proj", "lm_head"))
    config = quiet(max_grad_norm=1e-3, learning_rate=0.0)
    metrics = train_step(model, [collate(rows(4), 0)], build_optimizer(model, config), config)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    after = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
    assert metrics["grad_norm"] > 1e-2 and after == pytest.approx(1e-3, rel=1e-4)


def tiny_llama():
    return from_config(LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                   num_attention_heads=2))


@pytest.mark.parametrize("config", [
    LoraConfig(r=2, target_modules=["q_proj"], lora_bias=True),
    LoraConfig(r=2, target_modules=["q_proj"], use_dora=True),
    PromptEncoderConfig(num_virtual_tokens=3, encoder_hidden_size=8, task_type="CAUSAL_LM"),
    PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
], ids=lambda c: f"{type(c).__name__}{'-dora' if getattr(c, 'use_dora', False) else ''}")
def test_norms_biases_dora_magnitudes_and_prompt_embeddings_are_not_decayed(config):
    model = get_peft_model(tiny_llama(), config)
    if isinstance(config, LoraConfig):
        model.base_model.model.model.norm.weight.requires_grad_(True)  # a trained norm, as modules_to_save would
    groups = build_optimizer(model, TrainConfig(weight_decay=0.1)).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in groups if g["weight_decay"] == 0.1 for p in g["params"]}
    kept = {names[id(p)] for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert decayed | kept == {n for n, p in model.named_parameters() if p.requires_grad} and not decayed & kept
    expected_kept = {"lora_bias": {"lora_B.default.bias", "model.norm.weight"},
                     "dora": {"lora_magnitude_vector.default.weight", "model.norm.weight"},
                     "prompt": {"prompt_encoder.default.embedding.weight", ".bias"}}  # P-tuning MLP biases
    key = ("dora" if config.use_dora else "lora_bias") if isinstance(config, LoraConfig) else "prompt"
    assert {n for n in kept if any(n.endswith(e) for e in expected_kept[key])} == kept and kept
    assert all(p.ndim == 2 and "embedding" not in n for n, p in model.named_parameters() if n in decayed)


def test_gradient_checkpointing_trains_the_same_losses(tmp_path):
    losses = {}
    for checkpointing in (False, True):
        out = tmp_path / str(checkpointing)
        train(tiny_peft_model(dropout=0.1), rows(), [], quiet(max_steps=3, gradient_checkpointing=checkpointing), out)
        losses[checkpointing] = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses[True] == pytest.approx(losses[False], rel=1e-6)


def test_qlora_trains_through_the_same_loop_and_leaves_the_codes_alone(tmp_path):
    torch.manual_seed(0)
    base = quantize_model(from_config(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                                  num_hidden_layers=2, num_attention_heads=2)), "nf4")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]  # lm_head: fp32
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    codes = {n: b.clone() for n, b in model.named_buffers() if b.dtype == torch.uint8}
    assert codes  # the base really is 4-bit
    answer = [5, 6, 7, 8, 9]
    data = [TokenizedExample(r.where, r.input_ids[:4] + answer, [IGNORE_INDEX] * 4 + answer) for r in rows()]
    train(model, data, [], quiet(max_steps=15, learning_rate=3e-2, batch_size=4), tmp_path)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-3:]) < 0.8 * sum(losses[:3])
    assert all(torch.equal(b, codes[n]) for n, b in model.named_buffers() if n in codes)


class NoCheckpoints:
    def save_best(self):
        pass


@pytest.mark.parametrize("threshold, stops_after", [(0.01, 4), (0.0, None)])
def test_improvements_below_the_threshold_count_as_none(threshold, stops_after):
    """Eval losses falling by <= 0.003 per eval (0.008 in all): with threshold 0.01 none counts (the best
    stays the first), so patience 3 stops
    after the 4th eval; with threshold 0 each counts and training never stops early."""
    state, config = TrainState(), TrainConfig(patience=3, threshold=threshold)
    stopped_at = None
    for i, loss in enumerate([1.0, 0.997, 0.994, 0.992, 0.991], start=1):
        note_eval(state, {"eval_loss": loss}, config, NoCheckpoints())
        if state.stopped_early and stopped_at is None:
            stopped_at = i
    assert stopped_at == stops_after
