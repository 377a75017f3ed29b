"""`peftcore eval`: an adapter folder scored against its base.

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

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from peftcore.analysis.text_metrics import bleu, chrf, glossary_adherence, load_terms, mostly_cjk, repetition
from peftcore.data.records import PromptTemplate, collate
from peftcore.jobs.adapter_folder import RECIPE_FILE, Loaded, load_adapter_folder, load_base_alone, read_adapter_info
from peftcore.jobs.bases import TaskError
from peftcore.jobs.generate import eval_settings, generate_texts, one_line
from peftcore.jobs.tasks import Record, pad_id, parse_records, tokenize_records
from peftcore.multitask.heads import Classification, Generation, HeadKind, QuestionAnswering, TaskSpec, best_spans
from peftcore.multitask.model import HEADS_CONFIG, read_task_specs
from peftcore.training.loop import evaluate

log = logging.getLogger(__name__)

PERCENT = ("accuracy", "exact match")  # fractions in the results, shown as percentages


# -- eval -------------------------------------------------------------------------------------
@dataclass
class EvalData:
    """One task's eval records (a single-task adapter: its one task, named None)."""

    path: str
    head: HeadKind
    labels: list[str] | None  # classification: the class names, in the head's order
    records: list[Record]


def run_eval(adapter: Path | None, base: str | None = None, data: str | None = None, glossary: str | None = None,
             output: Path | None = None, max_records: int | None = None) -> dict:
    """Every task of the adapter folder (a single-task adapter: its one): the base (adapter disabled) vs
    the adapted model, one evaluate() over every task's rows as training's before / after. No adapter:
    the --base alone on --data (one column), for comparisons by hand."""
    if adapter is None:
        return run_base_eval(base, data, glossary, output, max_records)
    adapter = Path(adapter)
    _, info = read_adapter_info(adapter)
    tasks = eval_tasks(adapter, info, data)  # bad data fails before the model loads
    loaded = load_adapter_folder(adapter, base)
    settings = eval_settings(loaded, max_records=max_records)
    max_length = loaded.info["data"].get("max_length", 512)
    rows = {name: tokenize_records(task.records, loaded.tokenizer, max_length, task=name)
            for name, task in tasks.items()}
    every_row, pad = [row for task_rows in rows.values() for row in task_rows], pad_id(loaded.tokenizer)
    with loaded.peft_model.disable_adapter():
        base_scores = evaluate(loaded.model, every_row, settings.batch_size, pad, task_weights=loaded.task_weights)
    adapted_scores = evaluate(loaded.model, every_row, settings.batch_size, pad, task_weights=loaded.task_weights)
    scored = {}
    for name, task in tasks.items():
        scores = [s if name is None else {key.rpartition("/")[0]: v for key, v in s.items() if key.endswith(f"/{name}")}
                  for s in (base_scores, adapted_scores)]
        scored[name] = {"kind": task.head.name, "data": str(task.path), "records": len(task.records),
                        **task_metrics(name, task, loaded, rows[name], scores, settings, glossary or settings.glossary)}
    result = {"adapter": str(adapter), "base": loaded.base_name}
    if None in scored:
        result.update({key: v for key, v in scored[None].items() if key != "kind"})
        log.info(text_table(result))
        return write_reports(result, markdown_report(result), adapter, output)
    result.update(tasks=scored, weighted_loss=[base_scores["eval_loss"], adapted_scores["eval_loss"]])
    for name, task in scored.items():
        log.info(f"task {name} ({task['kind']}, {describe_records(task)}):\n{text_table(task)}")
    return write_reports(result, multitask_report(result), adapter, output)


def run_base_eval(base: str | None, data: str | None, glossary: str | None, output: Path | None,
                  max_records: int | None) -> dict:
    """The base alone on `data`: perplexity of the reference outputs and the generation metrics."""
    if not base or not data:
        raise TaskError("eval without --adapter scores the --base alone on --data FILE: pass both")
    loaded = load_base_alone(base)
    records = parse_records(data, loaded.template)  # bad data fails here, after a load (no recipe to check first)
    settings = eval_settings(loaded, max_records=max_records)
    rows = tokenize_records(records, loaded.tokenizer, loaded.info["data"]["max_length"])
    scores = evaluate(loaded.model, rows, settings.batch_size, pad_id(loaded.tokenizer))
    task = EvalData(data, Generation, None, records)
    result = {"adapter": None, "base": loaded.base_name, "data": data, "records": len(records), "columns": ["base"],
              **generation_metrics(loaded, task.records, settings, glossary, [scores["eval_ppl"]], alone=True)}
    log.info(text_table(result))
    return write_reports(result, markdown_report(result), Path.cwd(), Path(output or "report.md"))


def eval_tasks(adapter: Path, info: dict, data: str | None) -> dict[str | None, EvalData]:
    """A multi-task folder: its tasks' eval data from the recipe; else one task (None) on `data` or [data] eval."""
    if (adapter / HEADS_CONFIG).is_file():
        if data:
            raise TaskError("--data: a multi-task adapter is scored on each task's eval data from its recipe "
                            "([tasks.<name>] eval); leave --data out")
        return task_eval_records(adapter, info, read_task_specs(adapter))
    data = data or info.get("data", {}).get("eval")
    if not data:
        raise TaskError("no evaluation data: pass --data FILE (the adapter's recipe had no [data] eval)")
    labels, template = info.get("labels"), PromptTemplate(**info["data"]["template"])
    head = Generation if labels is None else Classification
    return {None: EvalData(data, head, labels, parse_records(data, template, labels))}


def write_reports(result: dict, markdown: str, adapter: Path, output: Path | None) -> dict:
    """The markdown report (default: report.md beside the adapter folder) and its numbers as JSON beside it."""
    output = Path(output) if output else Path(adapter).resolve().parent / "report.md"
    output.write_text(markdown, encoding="utf-8")
    output.with_suffix(".json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    log.info(f"report written to {output}")
    return result


@torch.no_grad()
def batched_logits(model, rows, batch_size: int, pad: int, **route):
    """The model's output per batch of rows (`route`: task=<name> for a multi-task model's head)."""
    model.eval()
    device = next(model.parameters()).device
    for start in range(0, len(rows), batch_size):
        batch = collate(rows[start : start + batch_size], pad)
        yield model(batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device), **route)


def predict(model, rows, batch_size: int, pad: int, **route) -> list[int]:
    """Predicted class per row."""
    return [label for logits in batched_logits(model, rows, batch_size, pad, **route)
            for label in logits.argmax(-1).tolist()]


def predict_spans(model, rows, batch_size: int, pad: int, **route) -> list[tuple[int, int]]:
    """A multi-task model's qa head: the best valid (first, last) answer token per row."""
    return [tuple(span) for logits in batched_logits(model, rows, batch_size, pad, **route)
            for span in best_spans(*logits).tolist()]


def wrong_answers(records: list[Record], rows, base: list, adapted: list, tokenizer, keep: int) -> dict:
    """Up to `keep` qa records whose adapted span is not the reference span, with both models' answers as text."""
    def text(row, span):
        return tokenizer.decode(row.input_ids[span[0] : span[1] + 1]).strip()
    samples = [{"where": r.where, "prompt": r.shown, "reference": text(row, row.span), "base": text(row, b),
                "adapted": text(row, a)} for r, row, b, a in zip(records, rows, base, adapted) if tuple(a) != row.span]
    return {"samples_title": "Answers the adapted model gets wrong", "samples": samples[: max(keep, 0)]}


def misclassified(records: list[Record], base_pred: list[int], adapted_pred: list[int], names: list[str],
                  keep: int) -> dict:
    """Up to `keep` records the adapted model gets wrong, with both models' predicted class names."""
    samples = [{"where": r.where, "prompt": r.shown, "reference": names[r.label], "base": names[b], "adapted": names[a]}
               for r, b, a in zip(records, base_pred, adapted_pred) if a != r.label][: max(keep, 0)]
    return {"samples_title": "Misclassified by the adapted model", "samples": samples}


def generation_metrics(loaded: Loaded, records, settings, glossary, ppl: list[float], alone: bool = False) -> dict:
    """Perplexity, BLEU / chrF, glossary and repetition: base and adapted (alone: the base, no adapter)."""
    chosen = records[: settings.max_records] if settings.max_records else records
    prompts, references = [r.prompt for r in chosen], [r.reference for r in chosen]
    outputs = {}
    with contextlib.nullcontext() if alone else loaded.peft_model.disable_adapter():
        outputs["base"] = generate_texts(loaded.peft_model, loaded.tokenizer, prompts, settings, loaded.device,
                                         progress="generate (base)")
    if not alone:
        outputs["adapted"] = generate_texts(loaded.peft_model, loaded.tokenizer, prompts, settings, loaded.device,
                                            progress="generate (adapted)")
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
        for outs in outputs.values():
            hyps = [outs[i] for i in idx]
            metrics.setdefault(f"BLEU{suffix or f' ({tok})'}", []).append(bleu(hyps, refs, tokenize=tok).score)
            metrics.setdefault(f"chrF{suffix}", []).append(chrf(hyps, refs).score)
    if glossary:
        terms = load_terms(glossary)
        for outs in outputs.values():
            g = glossary_adherence(outs, references, terms)
            metrics.setdefault("glossary adherence %", []).append(
                None if g["adherence"] is None else 100 * g["adherence"])
    for outs in outputs.values():
        rep = repetition(outs, tokenize=tokenize)
        metrics.setdefault("repeated 3-grams %", []).append(none_pct(rep["repeated_ngram_rate"]))
        metrics.setdefault("phrase loops %", []).append(none_pct(rep["phrase_loop_rate"]))
        metrics.setdefault("distinct-2 %", []).append(none_pct(rep["distinct_2"]))
    samples = [{"where": r.where, "prompt": r.shown, "reference": r.reference,
                **{name: outs[i] for name, outs in outputs.items()}}
               for i, r in enumerate(chosen[: max(settings.samples, 0)])]
    return {"metrics": metrics, "generated": len(chosen), "bleu_tokenize": tokenize, "samples": samples}


def none_pct(value):
    return None if value is None else 100 * value


def fmt(value) -> str:
    return "n/a" if value is None else f"{value:.2f}" if abs(value) < 1000 else f"{value:,.0f}"


def change(pair: list) -> str:
    if len(pair) != 2:  # the base alone: nothing to compare
        return ""
    base, adapted = pair
    return "" if base is None or adapted is None else f"{adapted - base:+.2f}"


def columns(result: dict) -> list[str]:
    return result.get("columns", ["base", "adapted"])


def shown(name: str, pair: list) -> tuple[str, list]:
    """A metric's title and values as printed: fractions (accuracy, exact match) as percentages."""
    if name in PERCENT:
        return name + " %", [None if v is None else 100 * v for v in pair]
    return name, pair


def text_table(result: dict) -> str:
    names = columns(result) + (["change"] if len(columns(result)) == 2 else [])
    lines = [f"{'metric':<28}" + "".join(f" {name:>10}" for name in names)]
    for name, pair in result["metrics"].items():
        title, values = shown(name, pair)
        cells = [fmt(v) for v in values] + ([change(values)] if len(values) == 2 else [])
        lines.append(f"{title:<28}" + "".join(f" {c:>10}" for c in cells))
    return "\n".join(lines)


def cell(text: str) -> str:
    return one_line(text, 300).replace("|", "\\|")


def markdown_report(result: dict) -> str:
    if result["adapter"] is None:
        out = [f"# Evaluation: {result['base']} (no adapter)", "",
               f"Data `{result['data']}` ({describe_records(result)}).", ""]
    else:
        out = [f"# Evaluation: {result['adapter']}", "",
               f"Base `{result['base']}`, data `{result['data']}` ({describe_records(result)}).",
               "Base = the same model with the adapter disabled.", ""]
    return "\n".join(out + metrics_table(result) + samples_table(result, "##")) + "\n"


def describe_records(result: dict) -> str:
    return (f"{result['records']} records"
            + (f", {result['generated']} generated greedily" if "generated" in result else ""))


def metrics_table(result: dict) -> list[str]:
    names = columns(result) + (["change"] if len(columns(result)) == 2 else [])
    out = ["| metric | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for name, pair in result["metrics"].items():
        title, values = shown(name, pair)
        cells = [fmt(v) for v in values] + ([change(values)] if len(values) == 2 else [])
        out.append(f"| {title} | " + " | ".join(cells) + " |")
    return out


def samples_table(result: dict, heading: str) -> list[str]:
    if not result.get("samples"):
        return []
    names = columns(result)
    out = ["", f"{heading} {result.get('samples_title', 'Sample generations')}", "",
           "| # | prompt | reference | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
    for i, s in enumerate(result["samples"], start=1):
        out.append(f"| {i} | {cell(s['prompt'])} | {cell(s['reference'])} | "
                   + " | ".join(cell(s[name]) for name in names) + " |")
    return out


# -- eval of a multi-task adapter --------------------------------------------------------------
MULTITASK_BASE_NOTE = ("Base = the same model with the shared adapter disabled. Classification and qa tasks keep their "
                       "trained heads there (the untrained heads are not saved), so their base column shows what the "
                       "adapter adds under the head trained with it, not the model before training.")


def task_eval_records(adapter: Path, info: dict, specs: dict[str, TaskSpec]) -> dict[str, EvalData]:
    """{task: its eval data} for the tasks whose [tasks.<name>] names eval data, parsed as training
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
            labels = class_names(spec) if spec.head is Classification else None
            out[name] = EvalData(path, spec.head, labels, parse_records(path, template, labels, kind=spec.kind))
    if not out:
        raise TaskError(f"no evaluation data: none of the recipe's tasks ({', '.join(specs)}) has eval = \"FILE\"")
    return out


def task_metrics(name: str | None, task: EvalData, loaded: Loaded, rows, scores: list[dict], settings,
                 glossary) -> dict:
    """One task's base / adapted metrics (`scores`: evaluate()'s numbers for this task, base then adapted)."""
    pad = pad_id(loaded.tokenizer)
    if task.head is Generation:  # the (shared) adapter and the LM head: the generation metrics
        return generation_metrics(loaded, task.records, settings, glossary, [s["eval_ppl"] for s in scores])
    loss = [s["eval_loss"] for s in scores]
    guess = predict_spans if task.head is QuestionAnswering else predict
    route = {} if name is None else {"task": name}  # a multi-task model's head
    with loaded.peft_model.disable_adapter():
        base_pred = guess(loaded.model, rows, settings.batch_size, pad, **route)
    adapted_pred = guess(loaded.model, rows, settings.batch_size, pad, **route)
    metrics = {"metrics": {task.head.metric_words: [s[task.head.metric] for s in scores], "loss": loss}}
    if task.head is QuestionAnswering:
        return {**metrics, **wrong_answers(task.records, rows, base_pred, adapted_pred, loaded.tokenizer,
                                           settings.samples)}
    return {**metrics, **misclassified(task.records, base_pred, adapted_pred, task.labels, settings.samples)}


def class_names(spec) -> list[str]:
    """A classification head's class names (a recipe with num_labels and no label file: "0", "1", ...)."""
    return spec.labels or [str(i) for i in range(spec.num_labels)]


def multitask_report(result: dict) -> str:
    base, adapted = result["weighted_loss"]
    summary = (f"Base `{result['base']}`; {len(result['tasks'])} tasks, each on the eval data its recipe names. "
               f"Weighted eval loss (what training's early stopping watched): "
               f"base {fmt(base)}, adapted {fmt(adapted)}.")
    out = [f"# Evaluation: {result['adapter']}", "", summary, MULTITASK_BASE_NOTE]
    for name, task in result["tasks"].items():
        out += ["", f"## Task {name} ({task['kind']})", "", f"Data `{task['data']}` ({describe_records(task)}).", ""]
        out += metrics_table(task) + samples_table(task, "###")
    return "\n".join(out) + "\n"
