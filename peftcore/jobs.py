"""`peftcore train`: a recipe in, an adapter folder out, with what a practitioner checks printed.

Order matters: the data is read and checked first (a bad line fails in a second, before any
model loads), then the base and its tokenizer, the data report, the perplexity (or accuracy)
before training, the one training loop (`peftcore.train.train`), and finally the saved adapter
is loaded back from disk to measure "after" and show sample generations, so the numbers printed
are the numbers of the files written.
"""
from __future__ import annotations

import json
import shutil
import time
from datetime import datetime
from pathlib import Path

import torch

from .data import pack
from .data_report import data_report, format_report, write_report
from .peft_model import get_peft_model
from .recipe import Recipe
from .tasks import (Loaded, Record, adapter_config, load_adapter_folder, load_base, pad_id, parse_records,
                    read_labels, resolve_base, save_adapter_folder, set_runtime, tokenize_records)
from .train import evaluate, train
from .train_state import set_seed

ADAPTER_DIR = "adapter"


def default_output_dir(resume: bool) -> Path:
    runs = Path("runs")
    if resume:
        candidates = sorted(p for p in runs.glob("*") if (p / "checkpoint").is_dir()) if runs.is_dir() else []
        if not candidates:
            raise FileNotFoundError("--resume: no run with a checkpoint under runs/; pass --output-dir")
        return candidates[-1]
    return runs / datetime.now().strftime("%Y%m%d-%H%M%S")


def run_train(recipe: Recipe, output_dir: Path, resume: bool = False, log=print) -> dict:
    from . import distributed

    started = time.perf_counter()
    output_dir = Path(output_dir)
    main = distributed.is_main()  # under torchrun only rank 0 prints and writes files
    log = log if main else (lambda *args, **kwargs: None)
    if not resume and (output_dir / "checkpoint").exists():
        raise FileExistsError(f"{output_dir} holds a run already: pass --resume to continue it, or another --output-dir")
    # 1. the data, parsed and checked before anything loads
    labels = read_labels(recipe.data.labels) if recipe.model.task == "SEQ_CLS" else None
    train_records = parse_records(recipe.data.train, recipe.data.template, labels, recipe.data.augment)
    eval_records = parse_records(recipe.data.eval, recipe.data.template, labels) if recipe.data.eval else []
    # 2. base + tokenizer
    device = set_runtime(recipe.model)
    base_folder = resolve_base(recipe.model.base_name, log=log)
    from peftcore.models import load_tokenizer

    tokenizer = load_tokenizer(base_folder)
    pad = pad_id(tokenizer)
    # 3. tokens and the data report
    train_rows = tokenize_records(train_records, tokenizer, recipe.data.max_length)
    eval_rows = tokenize_records(eval_records, tokenizer, recipe.data.max_length)
    report = data_report([r.example for r in train_records], train_rows, recipe.data.max_length)
    if labels is not None:
        report["label_counts"] = {name: sum(r.label == i for r in train_records) for i, name in enumerate(labels)}
        report["trained_tokens"] = len(train_rows)  # classification: one trained target (the label) per record
    log(format_report(report))
    if labels is not None:
        log("  labels: " + ", ".join(f"{name} {n}" for name, n in report["label_counts"].items()))
    if main:
        write_report(report, output_dir)
    if recipe.data.packing and labels is None:
        train_rows = pack(train_rows, recipe.data.max_length)
        log(f"  packed into {len(train_rows)} rows of up to {recipe.data.max_length} tokens")
    # 4. model + adapter
    set_seed(recipe.train.seed)
    model = load_base(base_folder, recipe.model, labels, device=device, seed=recipe.train.seed)
    peft_model = get_peft_model(model, adapter_config(recipe, model, recipe.model.base_name, base_folder))
    trainable, total = peft_model.get_nb_trainable_parameters()
    log(f"model: {recipe.model.base_name} ({type(model).__name__}), adapter {recipe.adapter.method}: "
        f"{trainable:,d} trainable of {total:,d} parameters ({100 * trainable / total:.3f}%)")
    info = {**recipe.to_dict(), "labels": labels}
    if main:
        (output_dir / "recipe.json").write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    # 5. before
    batch = recipe.train.batch_size
    before = {}
    if eval_rows:
        with peft_model.disable_adapter():
            before = evaluate(peft_model, eval_rows, batch, pad)
        log("before: " + describe_eval(before))
    # 6. train
    state = train(peft_model, train_rows, eval_rows, recipe.train, output_dir, pad, resume=resume,
                  save_adapter=lambda folder: save_adapter_folder(peft_model, folder, base_folder, info))
    if not main:  # rank 0 alone picks, reloads and evaluates the adapter
        return {"steps": state.step}
    # 7. the adapter: the best evaluation's, else the last step's
    chosen = output_dir / "best" if (output_dir / "best").is_dir() else output_dir / "checkpoint" / "adapter"
    adapter = output_dir / ADAPTER_DIR
    shutil.rmtree(adapter, ignore_errors=True)
    shutil.copytree(chosen, adapter)
    del peft_model, model
    # 8. after, from the files
    loaded = load_adapter_folder(adapter, log=log)
    after = evaluate(loaded.peft_model, eval_rows, batch, pad) if eval_rows else {}
    if after:
        log("after:  " + describe_eval(after) + (f"  (adapter of step {state.best_step}, the best evaluation)"
                                                 if chosen.name == "best" else ""))
    samples = []
    if eval_records and labels is None and recipe.eval.samples:
        samples = show_samples(loaded, eval_records[: recipe.eval.samples], recipe.eval, log)
    summary = {"steps": state.step, "stopped_early": state.stopped_early, "best_step": state.best_step,
               "before": before, "after": after, "adapter": str(adapter), "seconds": time.perf_counter() - started,
               "samples": samples}
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    log(f"adapter saved to {adapter}  (metrics: {output_dir / 'metrics.jsonl'}; "
        f"try: peftcore eval --adapter {adapter})")
    return summary


def describe_eval(result: dict) -> str:
    text = f"eval loss {result['eval_loss']:.3f}, perplexity {result['eval_ppl']:.2f}"
    if "eval_accuracy" in result:
        text = f"eval accuracy {100 * result['eval_accuracy']:.1f}%, loss {result['eval_loss']:.3f}"
    return text


# -- generation -------------------------------------------------------------------------------
def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """As the training rows begin: BOS (when the tokenizer has one), then the prompt's tokens."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + tokenizer.encode(prompt, add_special_tokens=False)


@torch.no_grad()
def generate_texts(model, tokenizer, prompts: list[str], settings, device=None, seed: int = 0) -> list[str]:
    """Batched decoding (left-padded) of the continuation of each prompt."""
    model.eval()
    pad = pad_id(tokenizer)
    generator = torch.Generator(device=device or "cpu").manual_seed(seed) if settings.temperature else None
    outputs = []
    for start in range(0, len(prompts), max(1, settings.batch_size)):
        encoded = [prompt_ids(tokenizer, p) for p in prompts[start : start + settings.batch_size]]
        width = max(len(ids) for ids in encoded)
        ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=device)
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=device)
        tokens = model.generate(ids, attention_mask=mask, max_new_tokens=settings.max_new_tokens,
                                temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=pad, generator=generator)
        outputs += [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in tokens]
    return outputs


def show_samples(loaded: Loaded, records: list[Record], settings, log=print) -> list[dict]:
    generated = generate_texts(loaded.peft_model, loaded.tokenizer, [r.prompt for r in records], settings, loaded.device)
    mode = "greedy" if not settings.temperature else f"temperature {settings.temperature}"
    log(f"samples ({mode}, up to {settings.max_new_tokens} new tokens):")
    out = []
    for i, (record, text) in enumerate(zip(records, generated), start=1):
        log(f"[{i}] prompt:    {one_line(record.shown)}\n    reference: {one_line(record.reference)}\n"
            f"    generated: {one_line(text)}")
        out.append({"where": record.where, "prompt": record.shown, "reference": record.reference, "generated": text})
    return out


def one_line(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
