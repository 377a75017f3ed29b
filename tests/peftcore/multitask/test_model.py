"""Multi-task model (peftcore.multitask): one LoRA backbone, named heads routed per batch, per-task
weighted + normalised losses in the one training loop, save / load with the adapter, the recipe."""
import copy
import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from peftcore import LoraConfig, PeftModel, get_peft_model
from peftcore.data.records import IGNORE_INDEX, DataError, TokenizedExample, collate, qa_example, tokenize_span
from peftcore.jobs.recipe import RecipeError, load_recipe
from peftcore.models import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, from_config
from peftcore.multitask.heads import QuestionAnswering, TaskSpec, best_spans
from peftcore.multitask.model import HEADS_CONFIG, HEADS_WEIGHTS, MultiTaskModel
from peftcore.training.config import TrainConfig
from peftcore.training.loop import build_optimizer, evaluate, loss_sum, train, train_step
from tests.peftcore.jobs.test_train import run, tiny_builtin  # noqa: F401  (the autouse fixture: a tiny built-in model)

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
VOCAB = 40
START, END = 7, 8  # QA rows: the answer span runs from the START marker token to the END marker token


def tiny_multitask(seed=0, dropout=0.0, tasks=("cls", "gen", "qa")) -> MultiTaskModel:
    torch.manual_seed(seed)
    base = from_config(LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1))
    # The random lm_head (std 0.02) caps its logits near 0.3: adapt it too so generation can learn.
    backbone = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"],
                                               lora_dropout=dropout))
    specs = {"cls": TaskSpec("classification", num_labels=3), "gen": TaskSpec("generation"), "qa": TaskSpec("qa")}
    return MultiTaskModel(backbone, {name: specs[name] for name in tasks})


def cls_rows(n=12, seed=1):
    """The class is named by the last token (10, 11 or 12): learnable from the pooled (last-token) state."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        label = int(torch.randint(0, 3, (1,), generator=g))
        ids = [1] + torch.randint(13, VOCAB, (2 + i % 3,), generator=g).tolist() + [10 + label]
        out.append(TokenizedExample(f"c:{i}", ids, [IGNORE_INDEX] * len(ids), label=label, task="cls"))
    return out


def gen_rows(n=12, seed=2):
    """Every prompt gets the same answer; only the answer is trained."""
    g = torch.Generator().manual_seed(seed)
    answer = [5, 6, 7, 8, 9]
    out = []
    for i in range(n):
        prompt = [1] + torch.randint(10, VOCAB, (3 + i % 4,), generator=g).tolist()
        out.append(TokenizedExample(f"g:{i}", prompt + answer, [IGNORE_INDEX] * len(prompt) + answer, task="gen"))
    return out


def qa_rows(n=12, seed=3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = [1] + torch.randint(10, VOCAB, (8 + i % 3,), generator=g).tolist()
        start = 1 + int(torch.randint(0, 4, (1,), generator=g))
        end = start + 1 + int(torch.randint(0, 3, (1,), generator=g))
        ids[start], ids[end] = START, END
        out.append(TokenizedExample(f"q:{i}", ids, [IGNORE_INDEX] * len(ids), span=(start, end), task="qa"))
    return out


def all_rows(seed=0):
    return cls_rows(seed=1 + seed) + gen_rows(seed=2 + seed) + qa_rows(seed=3 + seed)


def quiet(**kw):
    return TrainConfig(**{"progress": False, "plots": False, "eval_every": 0, "lr_schedule": "constant", **kw})


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# -- training -----------------------------------------------------------------------------------
def test_multitask_training_lowers_every_tasks_eval_loss(tmp_path):
    model = tiny_multitask()
    eval_rows = cls_rows(9, seed=11) + gen_rows(6, seed=12) + qa_rows(9, seed=13)
    before = evaluate(model, eval_rows, 4, 0)
    train(model, all_rows(), eval_rows, quiet(max_steps=40, learning_rate=3e-2, batch_size=4, eval_every=20), tmp_path)
    after = evaluate(model, eval_rows, 4, 0)
    for task in ("cls", "gen", "qa"):
        assert after[f"eval_loss/{task}"] < 0.6 * before[f"eval_loss/{task}"], task
    assert after["eval_accuracy/cls"] > before["eval_accuracy/cls"] and after["eval_exact_match/qa"] > 0.5
    assert after["eval_loss"] == pytest.approx(sum(after[f"eval_loss/{t}"] for t in ("cls", "gen", "qa")))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all({"loss/cls", "loss/gen", "loss/qa"} <= set(r) for r in records if r["step"] > 0)
    evals = [r for r in records if "eval_loss" in r]
    assert evals[0]["eval_loss/cls"] == pytest.approx(before["eval_loss/cls"])  # step 0: the untrained adapter
    assert [r["step"] for r in evals] == [0, 20, 40]
    assert "eval_exact_match/qa" in evals[0] and "eval_ppl/gen" in evals[0]
    assert "eval_ppl/cls" not in evals[0]


def test_a_step_takes_one_micro_batch_per_task_per_accumulation_round(tmp_path, monkeypatch):
    import peftcore.training.loop as train_module

    seen = []
    real_step = train_module.train_step

    def record(model, micro_batches, *args, **kwargs):
        seen.append([(b["task"], b["input_ids"].shape[0]) for b in micro_batches])
        return real_step(model, micro_batches, *args, **kwargs)

    monkeypatch.setattr(train_module, "train_step", record)
    rows = cls_rows(5) + gen_rows(12)  # cls repeats its (5-row) epoch more often than gen
    train(tiny_multitask(tasks=("cls", "gen")), rows, [], quiet(max_steps=3, batch_size=2, grad_accum=2), tmp_path)
    assert seen[0] == [("cls", 2), ("gen", 2), ("cls", 2), ("gen", 2)]
    assert seen[1][0] == ("cls", 1) and all(len(step) == 4 for step in seen)  # the end of cls's first epoch


def test_routing_a_batch_trains_its_head_and_the_shared_adapter_only():
    model = tiny_multitask()
    loss, _, _ = loss_sum(model, collate(cls_rows(4), 0))
    loss.backward()
    touched = grads(model)
    assert {"heads.cls.weight", "heads.cls.bias"} <= set(touched) and not any(n.startswith("heads.qa") for n in touched)
    assert any(".lora_A." in n for n in touched) and all(g.abs().sum() > 0 for n, g in touched.items() if "lora_B" in n)
    model.zero_grad(set_to_none=True)
    loss_sum(model, collate(gen_rows(4), 0))[0].backward()
    assert not any(n.startswith("heads.") for n in grads(model))  # generation reuses the LM head: no new parameters


def test_unknown_task_is_one_line_listing_the_known_tasks():
    model = tiny_multitask()
    with pytest.raises(ValueError, match=r"^unknown task 'intnet'; known tasks: cls, gen, qa$"):
        model(torch.tensor([[1, 2, 3]]), task="intnet")
    with pytest.raises(ValueError, match=r"task 'cls' \(classification\) takes labels \(1,\)"):
        model(torch.tensor([[1, 2, 3]]), task="cls", labels=torch.tensor([[1, 2, 3]]))
    with pytest.raises(ValueError, match="a batch must hold rows of one task"):
        collate(cls_rows(1) + qa_rows(1), 0)


def test_zero_weight_task_is_not_trained_and_its_head_does_not_move():
    model = tiny_multitask()
    head = model.heads["qa"].weight.detach().clone()
    config = quiet(learning_rate=1e-2, weight_decay=0.1, max_steps=1, task_weights={"qa": 0.0})
    optimizer = build_optimizer(model, config)
    batches = [collate(cls_rows(4), 0), collate(qa_rows(4), 0), collate(gen_rows(4), 0)]
    for _ in range(2):  # the second step would move a head through AdamW's momentum or decay
        metrics = train_step(model, batches, optimizer, config)
    assert torch.equal(model.heads["qa"].weight, head) and model.heads["qa"].weight.grad is None
    assert set(metrics["task_losses"]) == {"cls", "gen"}


def test_doubling_a_weight_doubles_that_tasks_gradient_contribution():
    batches = [collate(cls_rows(4), 0), collate(gen_rows(4), 0)]

    def step_grads(weights):
        model = tiny_multitask(tasks=("cls", "gen"))
        config = quiet(learning_rate=0.0, max_grad_norm=None, task_weights=weights)
        train_step(model, batches, build_optimizer(model, config), config)
        return grads(model)

    one, two, cls_only = step_grads({"cls": 1.0, "gen": 1.0}), step_grads({"cls": 2.0, "gen": 1.0}), \
        step_grads({"cls": 1.0, "gen": 0.0})
    torch.testing.assert_close(two["heads.cls.weight"], 2 * one["heads.cls.weight"])
    for name in one:  # shared LoRA tensors: the cls term counts twice, the gen term once
        cls_part = cls_only.get(name, torch.zeros_like(one[name]))  # lm_head's LoRA: generation only
        torch.testing.assert_close(two[name], one[name] + cls_part, atol=1e-6, rtol=1e-5, msg=name)
    assert any(cls_only[n].abs().sum() > 0 and (one[n] - cls_only[n]).abs().sum() > 0
               for n in cls_only if "lora_B" in n)


def test_per_task_normalisation_equals_the_hand_computation():
    weights = {"cls": 0.5, "gen": 2.0, "qa": 1.5}
    chunks = {"cls": cls_rows(7), "gen": gen_rows(7), "qa": qa_rows(7)}
    batches = [collate(chunks[t][i:j], 0) for i, j in ((0, 4), (4, 7)) for t in chunks]  # uneven micro-batches
    model, reference = tiny_multitask(), tiny_multitask()
    config = quiet(learning_rate=0.0, max_grad_norm=None, task_weights=weights)
    metrics = train_step(model, batches, build_optimizer(model, config), config)
    total, per_task, targets = 0.0, {}, {}
    for task in chunks:  # weight x (summed loss of the task's batches) / (the task's targets in the step)
        sums = [loss_sum(reference, b) for b in batches if b["task"] == task]
        targets[task] = sum(n for _, n, _ in sums)
        mean = sum(s for s, _, _ in sums) / targets[task]
        per_task[task], total = float(mean.detach()), total + weights[task] * mean
    total.backward()
    assert targets == {"cls": 7, "gen": 7 * 5, "qa": 7}  # rows, answer tokens, rows
    assert metrics["loss"] == pytest.approx(float(total.detach()), rel=1e-6)
    assert metrics["task_losses"] == pytest.approx(per_task, rel=1e-6)
    for name, g in grads(reference).items():
        torch.testing.assert_close(grads(model)[name], g, atol=1e-7, rtol=1e-5, msg=name)


def test_grad_accumulation_equals_one_big_batch_per_task():
    rows = {"cls": cls_rows(8), "gen": gen_rows(8), "qa": qa_rows(8)}
    big, small = tiny_multitask(), tiny_multitask()
    config = quiet(learning_rate=1e-2, max_steps=1)
    train_step(big, [collate(r, 0) for r in rows.values()], build_optimizer(big, config), config)
    train_step(small, [collate(r[i : i + 2], 0) for i in range(0, 8, 2) for r in rows.values()],
               build_optimizer(small, config), config)
    for (name, a), (_, b) in zip(big.named_parameters(), small.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
    assert not torch.equal(big.heads["qa"].weight, tiny_multitask().heads["qa"].weight)


def test_a_generation_task_trains_exactly_like_single_task_training():
    plain_rows = [TokenizedExample(r.where, r.input_ids, r.labels) for r in gen_rows(8)]
    multi = tiny_multitask(tasks=("gen",))
    plain = copy.deepcopy(multi.backbone)
    config = quiet(learning_rate=1e-2, max_steps=1)
    m = train_step(multi, [collate(gen_rows(8)[i : i + 4], 0) for i in (0, 4)], build_optimizer(multi, config), config)
    p = train_step(plain, [collate(plain_rows[i : i + 4], 0) for i in (0, 4)], build_optimizer(plain, config), config)
    assert m["loss"] == p["loss"] and m["grad_norm"] == p["grad_norm"] and m["task_losses"] == {"gen": p["loss"]}
    for (name, a), (_, b) in zip(multi.backbone.named_parameters(), plain.named_parameters()):
        assert torch.equal(a, b), name


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path, monkeypatch):
    config = TrainConfig(max_steps=6, learning_rate=5e-3, batch_size=3, lr_schedule="cosine", warmup_steps=1,
                         checkpoint_every=2, progress=False, eval_every=0, task_weights={"gen": 0.5})
    rows = cls_rows(5) + gen_rows(8) + qa_rows(7)  # epochs of different lengths
    full = tiny_multitask(dropout=0.1)
    train(full, rows, [], config, tmp_path / "full")
    import peftcore.training.loop as train_module

    calls, real_step = {"n": 0}, train_module.train_step

    def crash_on_step_4(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("simulated crash")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_step", crash_on_step_4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tiny_multitask(dropout=0.1), rows, [], config, tmp_path / "part")
    monkeypatch.undo()
    resumed = tiny_multitask(dropout=0.1)
    with torch.no_grad():  # scrambled: resuming must restore the adapter and the heads
        for p in resumed.parameters():
            if p.requires_grad:
                p.normal_()
    state = train(resumed, rows, [], config, tmp_path / "part", resume=True)
    assert set(state.task_positions) == {"cls", "gen", "qa"}

    def read(p):
        return [json.loads(line) for line in (p / "metrics.jsonl").read_text().splitlines()]

    part, whole = read(tmp_path / "part"), read(tmp_path / "full")
    # steps 1-3 were logged before the crash; resuming from step 2 drops step 3's line and logs 3-6 again
    assert [r["step"] for r in part] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "loss/cls", "loss/gen", "loss/qa"):
        assert [r[key] for r in part] == pytest.approx([r[key] for r in whole], rel=1e-6, abs=1e-7), key
    for (n, a), (_, b) in zip(full.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(a, b, msg=n)


# -- heads ---------------------------------------------------------------------------------------
def test_pooling_and_spans_are_the_same_under_left_right_and_no_padding():
    model = tiny_multitask().eval()
    short, long = [1, 12, 13, 14], [1, 20, 21, 22, 23, 24, 25]
    pad = 0
    right = torch.tensor([short + [pad] * 3, long]), torch.tensor([[1] * 4 + [0] * 3, [1] * 7])
    left = torch.tensor([[pad] * 3 + short, long]), torch.tensor([[0] * 3 + [1] * 4, [1] * 7])
    alone = torch.tensor([short])
    with torch.no_grad():
        expected = model(alone, task="cls")[0]
        torch.testing.assert_close(model(right[0], attention_mask=right[1], task="cls")[0], expected,
                                   atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(model(left[0], attention_mask=left[1], task="cls")[0], expected,
                                   atol=1e-5, rtol=1e-4)
        start, _ = model(left[0], attention_mask=left[1], task="qa")
        alone_start, _ = model(alone, task="qa")
    torch.testing.assert_close(start[0, 3:], alone_start[0], atol=1e-5, rtol=1e-4)
    assert (start[0, :3] == torch.finfo(start.dtype).min).all()  # no span starts on a pad


def test_bert_backbone_pools_the_first_token_and_has_no_generation_head():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=24, max_position_embeddings=32)
    backbone = get_peft_model(BertModel(config), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
    model = MultiTaskModel(backbone, {"cls": TaskSpec("classification", num_labels=3), "qa": TaskSpec("qa")}).eval()
    assert model.specs["cls"].pooling == "first"
    ids = torch.tensor([[2, 11, 12, 3, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    with torch.no_grad():
        hidden = model.hidden_states(ids, mask)
        torch.testing.assert_close(model(ids, attention_mask=mask, task="cls"), model.heads["cls"](hidden[:, 0]))
        assert model(ids, attention_mask=mask, task="qa", labels=torch.tensor([[1, 2]])).ndim == 0
    with pytest.raises(ValueError, match="generation needs a model with an LM head; BertModel has none"):
        MultiTaskModel(get_peft_model(BertModel(config), LoraConfig(target_modules=["query"])),
                       {"gen": TaskSpec("generation")})


def test_gpt2_backbone_without_a_fused_loss_scores_generation_like_its_logits():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    backbone = get_peft_model(GPT2LMHeadModel(config), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"],
                                                                  fan_in_fan_out=True, init_lora_weights=False))
    model = MultiTaskModel(backbone, {"gen": TaskSpec("generation"), "cls": TaskSpec("classification", num_labels=3)})
    batch = collate(gen_rows(3), 0)
    loss, targets, _ = loss_sum(model, batch)
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"], task="gen")  # (B, T, vocab)
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                                 ignore_index=IGNORE_INDEX, reduction="sum")
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    assert targets == 3 * 5 and model.specs["cls"].pooling == "last"
    assert model(batch["input_ids"], attention_mask=batch["attention_mask"], task="cls").shape == (3, 3)


def test_save_and_load_round_trip_gives_identical_outputs_for_every_task(tmp_path):
    model = tiny_multitask()
    train(model, all_rows(), [], quiet(max_steps=3, learning_rate=1e-2, batch_size=4), tmp_path / "run")
    model.save_pretrained(tmp_path / "saved")
    assert {"adapter_config.json", "adapter_model.safetensors", HEADS_WEIGHTS, HEADS_CONFIG} <= \
        {p.name for p in (tmp_path / "saved").iterdir()}
    heads = json.loads((tmp_path / "saved" / HEADS_CONFIG).read_text())["tasks"]
    assert heads["cls"] == {"kind": "classification", "num_labels": 3, "labels": None, "pooling": "last", "weight": 1.0}
    fresh_base = tiny_multitask().backbone.unload()  # the same frozen base; adapter and heads come from the files
    loaded = MultiTaskModel.from_pretrained(fresh_base, tmp_path / "saved")
    model.eval()
    ids, mask = collate(qa_rows(3), 0)["input_ids"], collate(qa_rows(3), 0)["attention_mask"]
    with torch.no_grad():
        for task in ("cls", "gen"):
            torch.testing.assert_close(loaded(ids, attention_mask=mask, task=task),
                                       model(ids, attention_mask=mask, task=task))
        for a, b in zip(loaded(ids, attention_mask=mask, task="qa"), model(ids, attention_mask=mask, task="qa")):
            torch.testing.assert_close(a, b)
    assert not any(p.requires_grad for p in loaded.parameters())
    backbone_only = PeftModel.from_pretrained(tiny_multitask().backbone.unload(), tmp_path / "saved")
    with torch.no_grad():  # the adapter alone loads as a plain PeftModel (HF PEFT's format)
        torch.testing.assert_close(backbone_only(ids, attention_mask=mask), model(ids, attention_mask=mask, task="gen"))


# -- data -----------------------------------------------------------------------------------------
class CharTokenizer:
    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def encode(self, text, add_special_tokens=False):  # a Llama-style post-processor: BOS first
        return [self.bos_token_id] * add_special_tokens + [3 + (ord(c) % 500) for c in text]

    def encode_with_offsets(self, text, add_special_tokens=False):
        return self.encode(text, add_special_tokens), [(i, i + 1) for i in range(len(text))]

    def decode(self, ids):
        return "".join(chr(i - 3) for i in ids)


def test_qa_span_labels_point_at_the_answer_tokens():
    context = "Restore points are kept 30 days; trash 30 days too."
    record = {"context": context, "question": "How long?", "answer": "30 days", "answer_start": context.index("30")}
    row = tokenize_span(qa_example(record, "qa.jsonl:1"), CharTokenizer(), 200)
    start, end = row.span
    assert CharTokenizer().decode(row.input_ids[start : end + 1]) == "30 days"
    assert row.input_ids[0] == 1 and CharTokenizer().decode(row.input_ids[1:11]) == "How long?\n"
    second = tokenize_span(qa_example({**record, "answer_start": record["context"].rindex("30 days")}, "qa.jsonl:2"),
                           CharTokenizer(), 200)
    assert second.span[0] > start and (
        CharTokenizer().decode(second.input_ids[second.span[0] : second.span[1] + 1]) == "30 days"
    )
    assert collate([row, second], 0)["labels"].tolist() == [list(row.span), list(second.span)]


@settings(deadline=None)
@given(st.integers(1, 3), st.integers(1, 12), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_best_spans_is_the_best_valid_span(B, T, max_answer_tokens, seed):
    g = torch.Generator().manual_seed(seed)
    start, end = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    spans = best_spans(start, end, max_answer_tokens).tolist()
    for b, (first, last) in enumerate(spans):
        assert first <= last < min(first + max_answer_tokens, T)
        valid = [(i, j) for i in range(T) for j in range(i, min(i + max_answer_tokens, T))]
        best = max(start[b, i] + end[b, j] for i, j in valid)
        assert start[b, first] + end[b, last] == best


def test_exact_match_counts_the_best_valid_span_not_two_argmaxes():
    start = torch.tensor([[0.0, 1.0, 5.0, 0.0]])  # start's argmax (2) comes after end's (1)
    end = torch.tensor([[0.0, 6.0, 0.0, 4.0]])
    assert best_spans(start, end).tolist() == [[2, 3]]
    assert QuestionAnswering.correct((start, end), torch.tensor([[2, 3]])) == 1
    assert QuestionAnswering.correct((start, end), torch.tensor([[2, 1]])) == 0  # an impossible span is never predicted


@pytest.mark.parametrize("record, message", [
    ({"context": "abc", "question": "q", "answer": "xyz"},
     "qa.jsonl:3: the answer 'xyz' does not occur in the context"),
    ({"context": "abc", "question": "q", "answer": "b", "answer_start": 2},
     "does not occur in the context at answer_start 2"),
    ({"context": "abc", "question": "q"},
     'qa.jsonl:3: a QA record needs string fields "context", "question" and "answer"'),
    ({"context": "abc", "question": "q", "answer": " "}, "qa.jsonl:3: the answer is empty"),
    ({"context": "30 days, then 30 days", "question": "q", "answer": "30 days"},
     r'qa.jsonl:3: the answer \'30 days\' occurs 2 times in the context \(at characters 0, 14\); add "answer_start"'),
])
def test_bad_qa_records_name_file_and_line(record, message):
    with pytest.raises(DataError, match=message):
        qa_example(record, "qa.jsonl:3")


def test_an_answer_cut_off_by_max_length_is_an_error():
    example = qa_example({"context": "x" * 50 + "answer", "question": "q", "answer": "answer"}, "qa.jsonl:7")
    with pytest.raises(DataError, match="qa.jsonl:7: the answer ends at token 58, past max_length 40"):
        tokenize_span(example, CharTokenizer(), 40)


# -- recipe and CLI -------------------------------------------------------------------------------
def test_the_example_recipe_trains_two_tasks_and_saves_adapter_and_heads(tmp_path):
    code, out, err = run("train", EXAMPLES / "multitask.toml", "--output-dir", tmp_path, "--max-steps", 2,
                         "--set", "data.max_length=96", "--set", "train.batch_size=4", "--set", "train.eval_every=2",
                         "--set", "eval.samples=1", "--set", "eval.max_new_tokens=4")
    assert code == 0, err
    assert "task intent (classification, weight 1, 48 eval records)" in out and "labels: billing 27" in out
    before = next(line for line in out.splitlines() if line.startswith("before: "))
    assert "intent accuracy" in before and "support perplexity" in before and "weighted loss" in before
    assert any(line.startswith("after:  intent accuracy") for line in out.splitlines())
    adapter = tmp_path / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors", HEADS_WEIGHTS, HEADS_CONFIG, "tokenizer.json"} <= \
        {p.name for p in adapter.iterdir()}
    assert set(json.loads((adapter / HEADS_CONFIG).read_text())["tasks"]) == {"intent", "support"}
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 2 and {"eval_accuracy/intent", "eval_ppl/support"} <= set(summary["after"])
    assert len(summary["samples"]) == 1
    code, out, err = run("generate", "--adapter", adapter, "--max-new-tokens", 4, "Is there an SLA?")
    assert code == 0, err  # the shared adapter alone drives `peftcore generate`


def test_task_recipe_errors_name_the_table_and_key(tmp_path):
    (tmp_path / "t.jsonl").write_text('{"text": "hi", "label": 0}\n')
    base = '[model]\nbuiltin = "tiny-llama"\n[tasks.intent]\nkind = "classification"\ntrain = "t.jsonl"\n'

    def error(text):
        (tmp_path / "r.toml").write_text(text)
        with pytest.raises(RecipeError) as e:
            load_recipe(tmp_path / "r.toml")
        return str(e.value)

    assert error(base + "num_labels = 2\nwieght = 2\n") == (
        "r.toml: unknown key [tasks.intent] wieght; did you mean weight?"
    )
    assert error(base) == 'r.toml: [tasks.intent] a classification task needs labels = "labels.json" or num_labels'
    assert "kind = 'clasify'; choose from classification, generation, qa" in error(
        base.replace('"classification"', '"clasify"') + "num_labels = 2\n"
    )
    assert error(base + "num_labels = 2\n[data]\ntrain = \"t.jsonl\"\n").startswith(
        "r.toml: [data] train: a multi-task recipe reads each task's data from [tasks.<name>] train")
    assert "[train] task_weights: set each task's weight in [tasks.<name>] weight" in error(
        base + "num_labels = 2\n[train]\ntask_weights = {intent = 2.0}\n"
    )
    assert "task name 'bad-name'" in error(base.replace("tasks.intent", 'tasks."bad-name"') + "num_labels = 2\n")
    recipe = load_recipe(EXAMPLES / "multitask.toml", ["tasks.intent.weight=0.5"])
    assert recipe.tasks["intent"].weight == 0.5 and recipe.tasks["support"].kind == "generation"
