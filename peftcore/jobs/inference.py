"""`peftcore eval`, `peftcore generate`, `peftcore merge`: what to do with an adapter folder.

`eval` scores the base (adapter disabled) and the adapted model on the same records and writes
a before/after report: perplexity of the reference outputs, BLEU / chrF of greedy generations
(character-tokenized for references that are mostly CJK: 13a would see a Japanese sentence as
one word), glossary adherence and repetition; accuracy for a classification adapter.

A multi-task adapter folder (task_heads.json beside the adapter, written by a recipe with
[tasks.<name>] tables) is scored per task on the eval data its recipe names: accuracy
(classification), exact match (qa), and for generation tasks everything a single-task generation
adapter gets. Its "base" is the model with the shared adapter disabled; classification and qa
keep their trained heads there (the untrained ones are not saved), so for those tasks the base
column measures what the adapter adds under its head, not the model before training.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import torch

from peftcore.models import save_pretrained

from peftcore.data.records import PromptTemplate, chat_prompt, collate
from peftcore.jobs.train import generate_texts, one_line
from peftcore.analysis.text_metrics import _is_cjk, bleu, chrf, glossary_adherence, load_terms, repetition
from peftcore.multitask.model import HEADS_CONFIG, MultiTaskModel, read_task_specs
from peftcore.multitask.heads import TaskSpec, best_spans
from peftcore.peft_model import PeftModel
from peftcore.lora.quantized_merge import format_merge_report
from peftcore.jobs.tasks import (
    RECIPE_FILE, TOKENIZER_FILES, Loaded, Record, TaskError, load_adapter_folder, load_base, pad_id, parse_records,
    read_adapter_info, resolve_base, set_runtime, tokenize_records,
)
from peftcore.training.loop import evaluate

PERCENT = ("accuracy", "exact match")  # fractions in the results, shown as percentages

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
    if (Path(adapter) / HEADS_CONFIG).is_file():
        return run_multitask_eval(adapter, base, data, glossary, output, max_records, log)
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
        result.update(misclassified(records, base_pred, predict(pm, rows, settings.batch_size, pad), loaded.labels,
                                    settings.samples))
    else:
        result.update(generation_metrics(loaded, records, settings, glossary or settings.glossary,
                                         [base_scores["eval_ppl"], adapted_scores["eval_ppl"]]))
    log(text_table(result))
    return write_reports(result, markdown_report(result), adapter, output, log)


def write_reports(result: dict, markdown: str, adapter: Path, output: Path | None, log=print) -> dict:
    """The markdown report (default: report.md beside the adapter folder) and its numbers as JSON beside it."""
    output = Path(output) if output else Path(adapter).resolve().parent / "report.md"
    output.write_text(markdown, encoding="utf-8")
    output.with_suffix(".json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    log(f"report written to {output}")
    return result


@torch.no_grad()
def predict(model, rows, batch_size: int, pad: int, **route) -> list[int]:
    """Predicted class per row (`route`: task=<name> for a multi-task model's head)."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(rows), batch_size):
        batch = collate(rows[start : start + batch_size], pad)
        logits = model(batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device), **route)
        out += logits.argmax(-1).tolist()
    return out


def predict_spans(model, rows, batch_size: int, pad: int, task: str) -> list[tuple[int, int]]:
    """A multi-task model's qa head: the best valid (first, last) answer token per row."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(rows), batch_size):
        batch = collate(rows[start : start + batch_size], pad)
        logits = model(batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device), task=task)
        out += [tuple(span) for span in best_spans(*logits).tolist()]
    return out


def wrong_answers(records: list[Record], rows, base: list, adapted: list, tokenizer, keep: int) -> dict:
    """Up to `keep` qa records whose adapted span is not the reference span, with both models' answers as text."""
    def text(row, span):
        return tokenizer.decode(row.input_ids[span[0] : span[1] + 1]).strip()
    samples = [{"where": r.where, "prompt": r.shown, "reference": text(row, row.span), "base": text(row, b),
                "adapted": text(row, a)} for r, row, b, a in zip(records, rows, base, adapted) if tuple(a) != row.span]
    return {"samples_title": "Answers the adapted model gets wrong", "samples": samples[: max(keep, 0)]}


def misclassified(records: list[Record], base_pred: list[int], adapted_pred: list[int], names: list[str], keep: int) -> dict:
    """Up to `keep` records the adapted model gets wrong, with both models' predicted class names."""
    samples = [{"where": r.where, "prompt": r.shown, "reference": names[r.label], "base": names[b], "adapted": names[a]}
               for r, b, a in zip(records, base_pred, adapted_pred) if a != r.label][: max(keep, 0)]
    return {"samples_title": "Misclassified by the adapted model", "samples": samples}


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


def shown(name: str, pair: list) -> tuple[str, list]:
    """A metric's title and values as printed: fractions (accuracy, exact match) as percentages."""
    if name in PERCENT:
        return name + " %", [None if v is None else 100 * v for v in pair]
    return name, pair


def text_table(result: dict) -> str:
    lines = [f"{'metric':<28} {'base':>10} {'adapted':>10} {'change':>9}"]
    for name, pair in result["metrics"].items():
        title, values = shown(name, pair)
        lines.append(f"{title:<28} {fmt(values[0]):>10} {fmt(values[1]):>10} {change(values):>9}")
    return "\n".join(lines)


def cell(text: str) -> str:
    return one_line(text, 300).replace("|", "\\|")


def markdown_report(result: dict) -> str:
    out = [f"# Evaluation: {result['adapter']}", "",
           f"Base `{result['base']}`, data `{result['data']}` ({describe_records(result)}).",
           "Base = the same model with the adapter disabled.", ""]
    return "\n".join(out + metrics_table(result) + samples_table(result, "##")) + "\n"


def describe_records(result: dict) -> str:
    return f"{result['records']} records" + (f", {result['generated']} generated greedily" if "generated" in result else "")


def metrics_table(result: dict) -> list[str]:
    out = ["| metric | base | adapted | change |", "|---|---:|---:|---:|"]
    for name, pair in result["metrics"].items():
        title, values = shown(name, pair)
        out.append(f"| {title} | {fmt(values[0])} | {fmt(values[1])} | {change(values)} |")
    return out


def samples_table(result: dict, heading: str) -> list[str]:
    if not result.get("samples"):
        return []
    out = ["", f"{heading} {result.get('samples_title', 'Sample generations')}", "",
           "| # | prompt | reference | base | adapted |", "|---|---|---|---|---|"]
    for i, s in enumerate(result["samples"], start=1):
        out.append(f"| {i} | {cell(s['prompt'])} | {cell(s['reference'])} | {cell(s['base'])} | {cell(s['adapted'])} |")
    return out


# -- eval of a multi-task adapter --------------------------------------------------------------
MULTITASK_BASE_NOTE = ("Base = the same model with the shared adapter disabled. Classification and qa tasks keep their "
                       "trained heads there (the untrained heads are not saved), so their base column shows what the "
                       "adapter adds under the head trained with it, not the model before training.")


def run_multitask_eval(adapter: Path, base: str | None, data: str | None, glossary: str | None, output: Path | None,
                       max_records: int | None, log=print) -> dict:
    """Every task with eval data in the adapter's recipe: the base (adapter disabled) vs the adapted model."""
    if data:
        raise TaskError("--data: a multi-task adapter is scored on each task's eval data from its recipe "
                        "([tasks.<name>] eval); leave --data out")
    adapter = Path(adapter)
    config, info = read_adapter_info(adapter)
    tasks = task_eval_records(adapter, info, read_task_specs(adapter))  # bad data fails before the model loads
    model, loaded = load_multitask(adapter, config, info, base, log)
    settings = eval_settings(loaded, max_records=max_records)
    max_length = loaded.info["data"].get("max_length", 512)
    rows = {name: tokenize_records(records, loaded.tokenizer, max_length, task=name) for name, (_, records) in tasks.items()}
    every_row, pad = [row for task_rows in rows.values() for row in task_rows], pad_id(loaded.tokenizer)
    # one evaluate() over every task's rows, as training's before / after: per-task scores + the weighted loss
    with model.backbone.disable_adapter():
        base_scores = evaluate(model, every_row, settings.batch_size, pad, task_weights=model.task_weights)
    adapted_scores = evaluate(model, every_row, settings.batch_size, pad, task_weights=model.task_weights)
    result = {"adapter": str(adapter), "base": loaded.base_name, "tasks": {},
              "weighted_loss": [base_scores["eval_loss"], adapted_scores["eval_loss"]]}
    for name, (path, records) in tasks.items():
        scores = [{key.rpartition("/")[0]: v for key, v in s.items() if key.endswith(f"/{name}")}
                  for s in (base_scores, adapted_scores)]
        task = {"kind": model.specs[name].kind, "data": str(path), "records": len(records)}
        task.update(task_metrics(name, model, loaded, records, rows[name], scores, settings, glossary or settings.glossary))
        result["tasks"][name] = task
        log(f"task {name} ({task['kind']}, {describe_records(task)}):\n{text_table(task)}")
    return write_reports(result, multitask_report(result), adapter, output, log)


def load_multitask(adapter: Path, config: dict, info: dict, base: str | None, log=print) -> tuple[MultiTaskModel, Loaded]:
    """The base, the shared adapter and the saved heads (as `peftcore train` loads them for its "after"),
    and a Loaded around the backbone (the adapter + the LM head) for the generation metrics."""
    from peftcore.models import load_tokenizer

    base_name = base or config.get("base_model_name_or_path")
    if not base_name:
        raise TaskError(f"{adapter}/adapter_config.json names no base_model_name_or_path; pass --base PATH")
    base_name = "builtin:tiny-llama" if base_name == "builtin" else base_name  # --base builtin, as load_adapter_folder
    base_folder = resolve_base(base_name, log=log)
    section = SimpleNamespace(**{"group_size": None, "double_quant": False, "threads": 0, "device": "auto", **info["model"]})
    device = set_runtime(section)
    tokenizer = load_tokenizer(adapter if (adapter / "tokenizer.json").is_file() else base_folder)
    model = MultiTaskModel.from_pretrained(load_base(base_folder, section, None, device=device), adapter)
    return model, Loaded(model.backbone, tokenizer, info, base_folder, base_name, device)


def task_eval_records(adapter: Path, info: dict, specs: dict[str, TaskSpec]) -> dict[str, tuple[str, list[Record]]]:
    """{task: (eval file, records)} for the tasks whose [tasks.<name>] names eval data, parsed as training
    parsed them (peftcore.jobs.train.parse_task, without re-reading the training data); class names come
    from the saved head's spec, in the order the head was trained with."""
    template = PromptTemplate(**info["data"]["template"])
    tables = info.get("tasks") or {}
    if not tables:
        raise TaskError(f"no evaluation data: {adapter} has no {RECIPE_FILE} with [tasks.<name>] tables "
                        "(peftcore train writes it)")
    out = {}
    for name, spec in specs.items():
        path = (tables.get(name) or {}).get("eval")
        if path:
            labels = class_names(spec) if spec.kind == "classification" else None
            out[name] = (path, parse_records(path, template, labels, kind=spec.kind))
    if not out:
        raise TaskError(f"no evaluation data: none of the recipe's tasks ({', '.join(specs)}) has eval = \"FILE\"")
    return out


def task_metrics(name: str, model: MultiTaskModel, loaded: Loaded, records: list[Record], rows, scores: list[dict],
                 settings, glossary) -> dict:
    """One task's base / adapted metrics (`scores`: evaluate()'s numbers for this task, base then adapted)."""
    spec, pad = model.specs[name], pad_id(loaded.tokenizer)
    if spec.kind == "generation":  # the shared adapter and the LM head: exactly the single-task generation metrics
        return generation_metrics(loaded, records, settings, glossary, [s["eval_ppl"] for s in scores])
    loss = [s["eval_loss"] for s in scores]
    guess = predict_spans if spec.kind == "qa" else predict
    with model.backbone.disable_adapter():
        base_pred = guess(model, rows, settings.batch_size, pad, task=name)
    adapted_pred = guess(model, rows, settings.batch_size, pad, task=name)
    if spec.kind == "qa":
        return {"metrics": {"exact match": [s["eval_exact_match"] for s in scores], "loss": loss},
                **wrong_answers(records, rows, base_pred, adapted_pred, loaded.tokenizer, settings.samples)}
    return {"metrics": {"accuracy": [s["eval_accuracy"] for s in scores], "loss": loss},
            **misclassified(records, base_pred, adapted_pred, class_names(spec), settings.samples)}


def class_names(spec) -> list[str]:
    """A classification head's class names (a recipe with num_labels and no label file: "0", "1", ...)."""
    return spec.labels or [str(i) for i in range(spec.num_labels)]


def multitask_report(result: dict) -> str:
    base, adapted = result["weighted_loss"]
    summary = (f"Base `{result['base']}`; {len(result['tasks'])} tasks, each on the eval data its recipe names. "
               f"Weighted eval loss (what training's early stopping watched): base {fmt(base)}, adapted {fmt(adapted)}.")
    out = [f"# Evaluation: {result['adapter']}", "", summary, MULTITASK_BASE_NOTE]
    for name, task in result["tasks"].items():
        out += ["", f"## Task {name} ({task['kind']})", "", f"Data `{task['data']}` ({describe_records(task)}).", ""]
        out += metrics_table(task) + samples_table(task, "###")
    return "\n".join(out) + "\n"


# -- generate ---------------------------------------------------------------------------------
def run_generate(adapter: Path, prompt: str, base: str | None = None, raw: bool = False, instruction: str | None = None,
                 chat: bool = False, **settings) -> str:
    loaded = load_adapter_folder(adapter, base, log=lambda *a: None)
    if loaded.labels is not None:
        raise TaskError(f"{adapter} is a classification adapter ({', '.join(loaded.labels)}): use peftcore eval")
    text = prompt if raw else render_prompt(loaded.template, prompt, instruction, chat)
    options = eval_settings(loaded, **settings)
    options.batch_size = 1
    return generate_texts(loaded.peft_model, loaded.tokenizer, [text], options, loaded.device, seed=settings.get("seed") or 0)[0]


def render_prompt(template: PromptTemplate, prompt: str, instruction: str | None, chat: bool) -> str:
    """The prompt in the format the adapter trained on: the input template, or (chat) one user turn
    (after a system turn holding `instruction`, if given) in the chat template."""
    if not chat:
        return template.render({"input": prompt, "instruction": instruction or ""})
    system = [{"role": "system", "content": instruction}] if instruction else []
    return chat_prompt([*system, {"role": "user", "content": prompt}], template)


# -- merge ------------------------------------------------------------------------------------
def run_merge(adapter: Path, output: Path, base: str | None = None, into: str = "original", log=print) -> Path:
    """Fold the adapter into its base. A QLoRA adapter (trained over a quantized base) merges into the
    base's original weights by default, or with into="quantized" into the dequantized weights it was
    trained against (the merged model then computes exactly what training saw; the log reports what
    re-quantizing each merged layer would cost)."""
    if into not in ("original", "quantized"):
        raise TaskError(f"--into {into!r}: choose original or quantized")
    loaded = load_adapter_folder(adapter, base, merge_ready=into == "original", log=log)
    if not isinstance(loaded.peft_model, PeftModel) or loaded.peft_model.is_prompt_learning:
        raise TaskError(f"{adapter} holds a prompt-learning adapter: it adds inputs, not weights, so there is "
                        "nothing to merge; load it with the base instead")
    quantized = (loaded.info.get("model") or {}).get("quantize")
    if into == "quantized" and not quantized:
        raise TaskError(f"--into quantized: {adapter} was not trained over a quantized base (its recipe has no quantize)")
    merged = loaded.peft_model.merge_and_unload()
    if into == "quantized":
        log(format_merge_report(loaded.peft_model.merge_report))
    elif quantized:
        log(f"the adapter trained over the {quantized} rounding of the base; merged into the original weights "
            "(--into quantized: into the rounded ones it saw)")
    output = Path(output)
    save_pretrained(merged, output)
    for name in TOKENIZER_FILES:
        source = Path(adapter) / name if (Path(adapter) / name).is_file() else loaded.base_folder / name
        if source.is_file():
            shutil.copy2(source, output / name)
    log(f"merged {loaded.base_name} + {adapter} -> {output} (config.json, model.safetensors, tokenizer)")
    return output
