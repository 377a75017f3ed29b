"""peftcore's Python API, top to bottom: the README's "API tour" as a script that runs as written.

    python examples/api_tour.py [CHECKPOINT] [--workdir DIR]

CHECKPOINT: any Hugging Face checkpoint folder (config.json + model.safetensors + tokenizer.json) of a
Llama-family model (Llama, Mistral, Qwen2, SmolLM2, ...), or a llama.cpp .gguf file of one. The default,
builtin:tiny-llama, is peftcore's built-in tiny Llama: made from the bundled data on first use (~30 s on
a laptop CPU, nothing downloaded), then cached. What the tour writes goes to DIR, or to a temporary
folder removed at the end; a run on the built-in model takes a few seconds.

The part between the "--- tour ---" markers is the README's API tour; tests/test_api_tour.py runs it.
"""
# The tour's own imports open the tour part, below this setup, so that the README shows them:
# ruff: noqa: E402
import argparse
import atexit
import shutil
import tempfile
from pathlib import Path

from peftcore.jobs.bases import resolve_base

parser = argparse.ArgumentParser(description="peftcore's API tour, on a local checkpoint")
parser.add_argument("checkpoint", nargs="?", default="builtin:tiny-llama",
                    help="an HF checkpoint folder or a .gguf file (default: builtin:tiny-llama)")
parser.add_argument("--workdir", help="keep what the tour writes in this folder (default: a temporary one)")
args = parser.parse_args()
checkpoint = str(resolve_base(args.checkpoint))  # builtin:tiny-llama -> its cached checkpoint folder
workdir = Path(args.workdir or tempfile.mkdtemp(prefix="peftcore-tour-"))
workdir.mkdir(parents=True, exist_ok=True)
if not args.workdir:
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)  # removed at the end, even when a check fails

# --- tour ---
import torch

from peftcore import LoraConfig, MultiTaskModel, PeftModel, PrefixTuningConfig, TaskSpec, TaskType, get_peft_model
from peftcore.data.records import PromptTemplate, collate
from peftcore.jobs.builtin import DATA_DIR  # the bundled example data (examples/data)
from peftcore.jobs.tasks import pad_id, parse_records, read_labels, tokenize_records
from peftcore.lora.pruning import prune_model
from peftcore.lora.quantized_merge import format_merge_report
from peftcore.models import generate, load_pretrained, load_tokenizer, save_pretrained
from peftcore.training.config import TrainConfig
from peftcore.training.loop import evaluate, train

# A base model and its tokenizer: `checkpoint` is an HF checkpoint folder or a .gguf file.
model = load_pretrained(checkpoint, dtype=torch.float32)  # or quantize="nf4" (QLoRA, below)
tokenizer = load_tokenizer(checkpoint)
texts = ["How do I restore a deleted folder?", "I was charged twice this month.", "Sync is stuck again."]
batch = tokenizer(texts)  # right-padded to the longest text
input_ids, mask = batch["input_ids"], batch["attention_mask"]  # (B, T) each; mask 0 = padding
logits = model(input_ids, attention_mask=mask)  # (B, T, vocab)
prompts = tokenizer(["How do I restore a", "The sync client"], padding_side="left")  # generate() continues rows
tokens = generate(model, prompts["input_ids"], attention_mask=prompts["attention_mask"], max_new_tokens=16)
print("base model:", [tokenizer.decode(row) for row in tokens])  # (B, T + 16): greedy, or temperature / top_p

# Training rows from JSONL records: checked (a bad record names its file:line), tokenized, prompt labels -100.
template = PromptTemplate(chat_template=tokenizer.chat_template)  # the base's chat template, if it has one
pad = pad_id(tokenizer)
support = tokenize_records(parse_records(DATA_DIR / "support_train.jsonl", template), tokenizer, max_length=256)
support_eval = tokenize_records(parse_records(DATA_DIR / "support_eval.jsonl", template), tokenizer, max_length=256)

# LoRA: HF PEFT's config names and defaults; the base stays frozen, only the adapter trains.
pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"],
                                      lora_dropout=0.05, task_type=TaskType.CAUSAL_LM))
pm.print_trainable_parameters()  # trainable params: ... || all params: ... || trainable%: ...
before = evaluate(pm, support_eval, 8, pad)["eval_ppl"]
config = TrainConfig(learning_rate=3e-3, batch_size=8, max_steps=4, progress=False, plots=False)
train(pm, support, support_eval, config, workdir / "run", pad_token_id=pad)  # checkpoints, metrics.jsonl
print(f"support perplexity {before:.1f} -> {evaluate(pm, support_eval, 8, pad)['eval_ppl']:.1f} after 4 steps")

# Adapter folders in HF PEFT's format, both ways: one saved here loads in PEFT, one saved by PEFT loads here.
pm.save_pretrained(workdir / "adapter")  # adapter_config.json + adapter_model.safetensors
pm = PeftModel.from_pretrained(load_pretrained(checkpoint), workdir / "adapter")  # for inference (eval mode)
other = get_peft_model(load_pretrained(checkpoint), LoraConfig(r=4, target_modules=["q_proj", "k_proj"],
                                                               init_lora_weights=False))  # random B: not a no-op
other.save_pretrained(workdir / "other-adapter")  # stands in for a second fine-tune of the same base
pm.load_adapter(workdir / "other-adapter", "other")  # beside "default", which stays the active one

# One batch, one adapter per row ("__base__": none), computed sub-batch by sub-batch.
mixed = pm(input_ids, attention_mask=mask, adapter_names=["default", "other", "__base__"])  # (B, T, vocab)
adapted = pm(input_ids, attention_mask=mask)  # every row through the active adapter, "default"
with pm.disable_adapter():
    base_logits = pm(input_ids, attention_mask=mask)  # the base model alone
pm.set_adapter("other")
other_logits = pm(input_ids, attention_mask=mask)
pm.set_adapter("default")
close = dict(rtol=1e-4, atol=1e-4)  # float32: a sub-batch takes other matmul shapes than the whole batch
torch.testing.assert_close(mixed[0], adapted[0], **close)
torch.testing.assert_close(mixed[1], other_logits[1], **close)
torch.testing.assert_close(mixed[2], base_logits[2], **close)
assert not torch.allclose(mixed[0], mixed[2]), "the trained adapter changes nothing"
print(f"mixed batch == per-adapter runs; default vs base: max |logit diff| {(adapted - base_logits).abs().max():.3f}")

# Merge: fold the active adapter into the base weights -> a plain model, as fast as the base.
merged = pm.merge_and_unload()
torch.testing.assert_close(merged(input_ids, attention_mask=mask), adapted, **close)
save_pretrained(merged, workdir / "merged")  # config.json + model.safetensors: loads in transformers too
reloaded = load_pretrained(workdir / "merged")
torch.testing.assert_close(reloaded(input_ids, attention_mask=mask), adapted, **close)
print("merged == unmerged logits (saved and reloaded too)")

# QLoRA: NF4 base weights (packed 4-bit codes + scales, double-quantized) under float32 LoRA on every linear.
qbase = load_pretrained(checkpoint, quantize="nf4", double_quant=True)  # fused Triton kernels on CUDA
qlora = get_peft_model(qbase, LoraConfig(r=16, target_modules="all-linear"))
qlora.print_trainable_parameters()  # a 4-bit weight counts as out x in parameters, as in HF PEFT
q_logits = qlora(input_ids, attention_mask=mask)
dense = qlora.merge_and_unload()  # dequantized, then merged: a dense model with the same outputs
torch.testing.assert_close(dense(input_ids, attention_mask=mask), q_logits, **close)
print(format_merge_report(qlora.merge_report))  # what re-quantizing the merged weights would cost, per layer

# 2:4 structured sparsity: in every group of 4 weights the 2 smallest become zero, in place.
report = prune_model(load_pretrained(checkpoint), pattern="2:4")  # the heads are left dense
print(f"2:4 pruning: {report['overall']:.0%} of the weights of {len(report['layers'])} layers are zero")

# Prefix tuning: learned keys / values for every layer, put into the KV cache once, at prefill.
prefix = get_peft_model(load_pretrained(checkpoint), PrefixTuningConfig(num_virtual_tokens=20,
                                                                        task_type=TaskType.CAUSAL_LM))
prefixed = prefix.generate(prompts["input_ids"], attention_mask=prompts["attention_mask"], max_new_tokens=16)
print("prefix-tuned output:", tuple(prefixed.shape))  # (B, T + up to 16): no virtual tokens in it

# Multi-task: one LoRA backbone shared by a head per task (classification, the LM head, an extractive QA span).
intent_labels = read_labels(DATA_DIR / "intent_labels.json")  # billing, restore, login, sync, ...
backbone = get_peft_model(load_pretrained(checkpoint), LoraConfig(r=8, lora_alpha=32, target_modules="all-linear"))
mt = MultiTaskModel(backbone, {"intent": TaskSpec("classification", labels=intent_labels),
                               "support": TaskSpec("generation"), "span": TaskSpec("qa", weight=0.5)})
intent_logits = mt(input_ids, attention_mask=mask, task="intent")  # (B, 6): the last real token pooled
start, end = mt(input_ids, attention_mask=mask, task="span")  # (B, T) each: where the answer starts / ends
rows = collate(support[:4], pad)  # input_ids, attention_mask, labels (-100 on prompt and padding)
loss = mt(rows["input_ids"], attention_mask=rows["attention_mask"], task="support", labels=rows["labels"])
print(f"intent logits {tuple(intent_logits.shape)}, span logits {tuple(start.shape)}, support loss {loss:.1f}")


def task_rows(task, kind, split, file, labels=None):  # one task's rows, each stamped with its task (.task)
    records = parse_records(DATA_DIR / f"{file}_{split}.jsonl", template, labels, kind=kind)
    return tokenize_records(records, tokenizer, max_length=256, task=task)


train_rows, eval_rows = ([*task_rows("intent", "classification", split, "intent", intent_labels),
                          *task_rows("support", "generation", split, "support"),
                          *task_rows("span", "qa", split, "support_qa")] for split in ("train", "eval"))
# Every step trains one batch of each task; each task's loss is averaged over its own targets, then weighted.
train(mt, train_rows, eval_rows, config, workdir / "mt-run", pad_token_id=pad)
scores = evaluate(mt, eval_rows, 8, pad)  # per task: eval_accuracy/intent, eval_ppl/support, eval_exact_match/span
print(f"multi-task after 4 steps: intent accuracy {scores['eval_accuracy/intent']:.1%}, "
      f"support perplexity {scores['eval_ppl/support']:.1f}, span exact match {scores['eval_exact_match/span']:.1%}")
mt.eval()  # dropout off (train() leaves the model in training mode)
mt.save_pretrained(workdir / "mt")  # the adapter (HF PEFT's format) + task_heads.safetensors / .json
loaded = MultiTaskModel.from_pretrained(load_pretrained(checkpoint), workdir / "mt")
torch.testing.assert_close(loaded(input_ids, attention_mask=mask, task="intent"),
                           mt(input_ids, attention_mask=mask, task="intent"), **close)
print("multi-task model saved and reloaded: same intent logits")
# --- end of tour ---

print("api tour: done")
