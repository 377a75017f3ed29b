"""`peftcore eval`, `peftcore generate`, `peftcore merge`: what to do with an adapter folder.

`eval` scores the base (adapter disabled) and the adapted model on the same records and writes
a before/after report: perplexity of the reference outputs, BLEU / chrF of greedy generations
(character-tokenized for references that are mostly CJK: 13a would see a Japanese sentence as
one word), glossary adherence and repetition; accuracy for a classification adapter.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import torch

from peftcore.models import save_pretrained

from .data import collate
from .jobs import generate_texts, one_line
from .metrics_text import _is_cjk, bleu, chrf, glossary_adherence, load_terms, repetition
from .peft_model import PeftModel
from .tasks import TOKENIZER_FILES, Loaded, TaskError, load_adapter_folder, pad_id, parse_records, tokenize_records
from .train import evaluate

EVAL_DEFAULTS = {"samples": 3, "max_new_tokens": 40, "temperature": 0.0, "top_k": None, "top_p": None,
                 "max_records": None, "batch_size": 8, "glossary": None}


def eval_settings(loaded: Loaded, **overrides) -> SimpleNamespace:
    settings = {**EVAL_DEFAULTS, **loaded.info.get("eval", {})}
    settings.update({k: v for k, v in overrides.items() if v is not None})
    return SimpleNamespace(**settings)


def mostly_cjk(texts: list[str]) -> bool:
    chars = [c for t in texts for c in t if not c.isspace()]
    return bool(chars) and sum(map(_is_cjk, chars)) > len(chars) / 2


# -- eval -------------------------------------------------------------------------------------
def run_eval(adapter: Path, base: str | None = None, data: str | None = None, glossary: str | None = None,
             output: Path | None = None, max_records: int | None = None, log=print) -> dict:
    loaded = load_adapter_folder(adapter, base, log=log)
    settings = eval_settings(loaded, max_records=max_records)
    data = data or loaded.info.get("data", {}).get("eval")
    if not data:
        raise TaskError("no evaluation data: pass --data FILE (the adapter's recipe had no [data] eval)")
    records = parse_records(data, loaded.template, loaded.labels)
    rows = tokenize_records(records, loaded.tokenizer, loaded.info["data"].get("max_length", 512))
    pm, pad = loaded.peft_model, pad_id(loaded.tokenizer)
    with pm.disable_adapter():
        base_scores = evaluate(pm, rows, settings.batch_size, pad)
    adapted_scores = evaluate(pm, rows, settings.batch_size, pad)
    result = {"adapter": str(adapter), "base": loaded.base_name, "data": str(data), "records": len(records)}
    if loaded.labels is not None:
        result["metrics"] = {"accuracy": [base_scores["eval_accuracy"], adapted_scores["eval_accuracy"]],
                             "loss": [base_scores["eval_loss"], adapted_scores["eval_loss"]]}
        with pm.disable_adapter():
            base_pred = predict(pm, rows, settings.batch_size, pad)
        adapted_pred, names = predict(pm, rows, settings.batch_size, pad), loaded.labels
        result["samples_title"] = "Misclassified by the adapted model"
        result["samples"] = [{"where": r.where, "prompt": r.shown, "reference": names[r.label], "base": names[b],
                              "adapted": names[a]} for r, b, a in zip(records, base_pred, adapted_pred)
                             if a != r.label][: max(settings.samples, 0)]
    else:
        result.update(generation_metrics(loaded, records, settings, glossary or settings.glossary,
                                         [base_scores["eval_ppl"], adapted_scores["eval_ppl"]]))
    output = Path(output) if output else Path(adapter).resolve().parent / "eval_report.md"
    output.write_text(markdown_report(result), encoding="utf-8")
    output.with_suffix(".json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    log(text_table(result))
    log(f"report written to {output}")
    return result


@torch.no_grad()
def predict(model, rows, batch_size: int, pad: int) -> list[int]:
    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(rows), batch_size):
        batch = collate(rows[start : start + batch_size], pad)
        out += model(batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).argmax(-1).tolist()
    return out


def generation_metrics(loaded: Loaded, records, settings, glossary, ppl: list[float]) -> dict:
    chosen = records[: settings.max_records] if settings.max_records else records
    prompts, references = [r.prompt for r in chosen], [r.reference for r in chosen]
    with loaded.peft_model.disable_adapter():
        base_out = generate_texts(loaded.peft_model, loaded.tokenizer, prompts, settings, loaded.device)
    adapted_out = generate_texts(loaded.peft_model, loaded.tokenizer, prompts, settings, loaded.device)
    metrics = {"perplexity": ppl}
    groups = {"": list(range(len(chosen)))}
    cjk = [i for i, ref in enumerate(references) if mostly_cjk([ref])]
    if cjk and len(cjk) < len(chosen):  # mixed languages: score each script with its own tokenization too
        groups = {"": groups[""], " (CJK refs, char)": cjk,
                  " (other refs, 13a)": [i for i in range(len(chosen)) if i not in set(cjk)]}
    tokenize = "char" if mostly_cjk(references) else "13a"
    for suffix, idx in groups.items():
        tok = tokenize if not suffix else ("char" if "char" in suffix else "13a")
        refs = [references[i] for i in idx]
        for name, outs in (("base", base_out), ("adapted", adapted_out)):
            hyps = [outs[i] for i in idx]
            metrics.setdefault(f"BLEU{suffix or f' ({tok})'}", []).append(bleu(hyps, refs, tokenize=tok).score)
            metrics.setdefault(f"chrF{suffix}", []).append(chrf(hyps, refs).score)
    if glossary:
        terms = load_terms(glossary)
        for outs in (base_out, adapted_out):
            g = glossary_adherence(outs, references, terms)
            metrics.setdefault("glossary adherence %", []).append(None if g["adherence"] is None else 100 * g["adherence"])
    for outs in (base_out, adapted_out):
        rep = repetition(outs, tokenize=tokenize)
        metrics.setdefault("repeated 3-grams %", []).append(none_pct(rep["repeated_ngram_rate"]))
        metrics.setdefault("phrase loops %", []).append(none_pct(rep["phrase_loop_rate"]))
        metrics.setdefault("distinct-2 %", []).append(none_pct(rep["distinct_2"]))
    samples = [{"where": r.where, "prompt": r.shown, "reference": r.reference, "base": b, "adapted": a}
               for r, b, a in list(zip(chosen, base_out, adapted_out))[: max(settings.samples, 0)]]
    return {"metrics": metrics, "generated": len(chosen), "bleu_tokenize": tokenize, "samples": samples}


def none_pct(value):
    return None if value is None else 100 * value


def fmt(value) -> str:
    return "n/a" if value is None else f"{value:.2f}" if abs(value) < 1000 else f"{value:,.0f}"


def change(pair: list) -> str:
    base, adapted = pair
    return "" if base is None or adapted is None else f"{adapted - base:+.2f}"


def text_table(result: dict) -> str:
    lines = [f"{'metric':<28} {'base':>10} {'adapted':>10} {'change':>9}"]
    for name, pair in result["metrics"].items():
        shown = [100 * v for v in pair] if name == "accuracy" else pair
        title = name + (" %" if name == "accuracy" else "")
        lines.append(f"{title:<28} {fmt(shown[0]):>10} {fmt(shown[1]):>10} {change(shown):>9}")
    return "\n".join(lines)


def cell(text: str) -> str:
    return one_line(text, 300).replace("|", "\\|")


def markdown_report(result: dict) -> str:
    out = [f"# Evaluation: {result['adapter']}", "",
           f"Base `{result['base']}`, data `{result['data']}` ({result['records']} records"
           + (f", {result['generated']} generated greedily" if "generated" in result else "") + ").",
           "Base = the same model with the adapter disabled.", "",
           "| metric | base | adapted | change |", "|---|---:|---:|---:|"]
    for name, pair in result["metrics"].items():
        shown = [100 * v for v in pair] if name == "accuracy" else pair
        out.append(f"| {name}{' %' if name == 'accuracy' else ''} | {fmt(shown[0])} | {fmt(shown[1])} | {change(shown)} |")
    if result.get("samples"):
        out += ["", f"## {result.get('samples_title', 'Sample generations')}", "",
                "| # | prompt | reference | base | adapted |", "|---|---|---|---|---|"]
        for i, s in enumerate(result["samples"], start=1):
            out.append(f"| {i} | {cell(s['prompt'])} | {cell(s['reference'])} | {cell(s['base'])} | {cell(s['adapted'])} |")
    return "\n".join(out) + "\n"


# -- generate ---------------------------------------------------------------------------------
def run_generate(adapter: Path, prompt: str, base: str | None = None, raw: bool = False, instruction: str | None = None,
                 **settings) -> str:
    loaded = load_adapter_folder(adapter, base, log=lambda *a: None)
    if loaded.labels is not None:
        raise TaskError(f"{adapter} is a classification adapter ({', '.join(loaded.labels)}): use peftcore eval")
    text = prompt if raw else loaded.template.render({"input": prompt, "instruction": instruction or ""})
    options = eval_settings(loaded, **settings)
    options.batch_size = 1
    return generate_texts(loaded.peft_model, loaded.tokenizer, [text], options, loaded.device, seed=settings.get("seed") or 0)[0]


# -- merge ------------------------------------------------------------------------------------
def run_merge(adapter: Path, output: Path, base: str | None = None, log=print) -> Path:
    loaded = load_adapter_folder(adapter, base, merge_ready=True, log=log)
    if not isinstance(loaded.peft_model, PeftModel) or loaded.peft_model.is_prompt_learning:
        raise TaskError(f"{adapter} holds a prompt-learning adapter: it adds inputs, not weights, so there is "
                        "nothing to merge; load it with the base instead")
    merged = loaded.peft_model.merge_and_unload()
    output = Path(output)
    save_pretrained(merged, output)
    for name in TOKENIZER_FILES:
        source = Path(adapter) / name if (Path(adapter) / name).is_file() else loaded.base_folder / name
        if source.is_file():
            shutil.copy2(source, output / name)
    log(f"merged {loaded.base_name} + {adapter} -> {output} (config.json, model.safetensors, tokenizer)")
    return output
