"""`peftcore train`: a recipe in, an adapter folder out, with what a practitioner checks printed.

Order matters: the data is read and checked first (a bad line fails in a second, before any
model loads), then the base and its tokenizer, the data report, the perplexity (or accuracy)
before training, the one training loop (`peftcore.training.loop.train`), and finally the saved adapter
is loaded back from disk to measure "after" and show sample generations, so the numbers printed
are the numbers of the files written.

A recipe with [tasks.<name>] tables runs `run_multitask_train` instead: the same order, per task
(data, rows, before / after metrics), one MultiTaskModel (peftcore.multitask) trained by the same
loop on all tasks at once; its adapter folder holds the LoRA adapter plus the task heads.
"""
from __future__ import annotations

import contextlib
import functools
import json
import shutil
import time
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

import torch

from peftcore.models.tokenizer import read_chat_template, read_json

from peftcore.jobs import run_folder
from peftcore.data.records import pack
from peftcore.data.report import data_report, format_report, write_report
from peftcore.multitask.model import MultiTaskModel, parts_of
from peftcore.multitask.heads import TaskSpec
from peftcore.peft_model import get_peft_model
from peftcore.jobs.recipe import Recipe, TaskSection
from peftcore.jobs.tasks import (
    Loaded, Record, adapter_config, load_adapter_folder, load_base, pad_id, parse_records, TaskError, read_labels,
    resolve_base, save_adapter_folder, set_runtime, tokenize_records,
)
from peftcore.training.loop import evaluate, train
from peftcore.training.state import replace_atomically, set_seed

ADAPTER_DIR = "adapter"


def default_output_dir(resume: bool) -> Path:
    runs = Path("runs")
    if resume:
        candidates = sorted(p for p in runs.glob("*") if (p / "checkpoint").is_dir()) if runs.is_dir() else []
        if not candidates:
            raise FileNotFoundError("--resume: no run with a checkpoint under runs/; pass --output-dir")
        return candidates[-1]
    return runs / datetime.now().strftime("%Y%m%d-%H%M%S")


def run_train(recipe: Recipe, output_dir: Path, resume: bool = False, log=print, overwrite: bool = False) -> dict:
    """overwrite: start afresh in a folder that holds a run (run_folder.prepare); resume: continue it."""
    from peftcore.training import distributed
    from peftcore.models import load_tokenizer

    if recipe.tasks:
        return run_multitask_train(recipe, output_dir, resume, log, overwrite)
    started, output_dir = time.perf_counter(), Path(output_dir)
    main = distributed.is_main()  # under torchrun only rank 0 prints and writes files
    log = log if main else (lambda *args, **kwargs: None)
    recipe = start_run(recipe, output_dir, resume, overwrite, log)
    # 1. the data, parsed and checked before anything loads
    labels = read_labels(recipe.data.labels) if recipe.model.task == "SEQ_CLS" else None
    train_records = parse_records(recipe.data.train, recipe.data.template, labels, recipe.data.augment)
    eval_records = parse_records(recipe.data.eval, recipe.data.template, labels) if recipe.data.eval else []
    # 2. base + tokenizer; 3. tokens and the data report
    device = set_runtime(recipe.model)
    base_folder = resolve_base(recipe.model.base_name, log=log)
    tokenizer = load_tokenizer(base_folder)
    pad, batch = pad_id(tokenizer), recipe.train.batch_size
    train_rows, eval_rows = tokenize_split(recipe, train_records, eval_records, tokenizer, labels,
                                           output_dir if main else None, log)
    # 4. model + adapter; 5. before
    peft_model = build_adapted(recipe, base_folder, device, labels, log)
    info = {**recipe.to_dict(), "labels": labels}
    if main:
        write_recipe(output_dir, info)
    before = score(peft_model.disable_adapter, peft_model, eval_rows, batch, pad, "before: ", log)
    # 6. train
    state = train(peft_model, train_rows, eval_rows, recipe.train, output_dir, pad, resume=resume,
                  save_adapter=lambda folder: save_adapter_folder(peft_model, folder, base_folder, info))
    if not main:  # rank 0 alone picks, reloads and evaluates the adapter
        return {"steps": state.step}
    # 7. the adapter: the best evaluation's, else the last step's; 8. after, from the files
    chosen, adapter = keep_chosen_adapter(output_dir)
    peft_model = None  # frees the trained copy before the files load
    loaded = load_adapter_folder(adapter, log=log)
    after = score(contextlib.nullcontext, loaded.peft_model, eval_rows, batch, pad, "after:  ", log, best_note(chosen, state))
    samples = []
    if eval_records and labels is None and recipe.eval.samples:
        samples = show_samples(loaded, eval_records[: recipe.eval.samples], recipe.eval, log)
    summary = write_summary(output_dir, state, before, after, adapter, started, samples)
    log(f"adapter saved to {adapter}  (metrics: {output_dir / 'metrics.jsonl'}; "
        f"try: peftcore eval --adapter {adapter})")
    return summary


def start_run(recipe: Recipe, output_dir: Path, resume: bool, overwrite: bool, log=print) -> Recipe:
    """The run folder checked (occupied: refused; resumed: a whole checkpoint, the run's recipe), then the
    recipe as the run uses it: the checkpoint's chat template filled in. Nothing loads before this."""
    run_folder.prepare(output_dir, resume, overwrite)
    recipe = with_checkpoint_chat_template(recipe, log)
    if resume:
        run_folder.check_same_recipe(recipe, output_dir)
    return recipe


def write_recipe(output_dir: Path, info: dict) -> None:
    """A resumed run keeps the recipe.json it started with (the one later resumes compare against)."""
    path = output_dir / run_folder.RECIPE_FILE
    if not path.exists():
        write_json(path, info)


def with_checkpoint_chat_template(recipe: Recipe, log=print) -> Recipe:
    """The base checkpoint's own chat template (chat_template.jinja / tokenizer_config.json) renders
    chat records unless the recipe sets one: the adapter then learns the format the model was tuned
    on. Read from the tokenizer files before any record is parsed, so records are parsed once. The
    built-in model ships none (peftcore.jobs.builtin), and a base that does not resolve is left to fail
    where it always does, after the data checks."""
    template = recipe.data.template
    if template.chat_template or recipe.model.builtin:
        return recipe
    try:
        folder = resolve_base(recipe.model.base_name, log=lambda *a: None)  # a path or a pip package: a lookup
    except TaskError:
        return recipe
    chat_template = read_chat_template(folder, read_json(folder / "tokenizer_config.json"))
    if not chat_template:
        return recipe
    log("chat records: rendered with the checkpoint's chat_template (tokenizer_config.json)")
    return replace(recipe, data=replace(recipe.data, template=replace(template, chat_template=chat_template)))


def tokenize_split(recipe: Recipe, train_records: list[Record], eval_records: list[Record], tokenizer,
                   labels: list[str] | None, report_dir: Path | None, log=print):
    """-> (train rows, eval rows); logs the data report (and writes it to report_dir); packs if asked."""
    max_length = recipe.data.max_length
    train_rows = tokenize_records(train_records, tokenizer, max_length)
    eval_rows = tokenize_records(eval_records, tokenizer, max_length)
    report = data_report(train_records, train_rows, max_length)
    if labels is not None:
        report["label_counts"] = {name: sum(r.label == i for r in train_records) for i, name in enumerate(labels)}
        report["trained_tokens"] = len(train_rows)  # classification: one trained target (the label) per record
    log(format_report(report))
    if labels is not None:
        log("  labels: " + ", ".join(f"{name} {n}" for name, n in report["label_counts"].items()))
    if report_dir is not None:
        write_report(report, report_dir)
    if recipe.data.packing and labels is None:
        train_rows = pack(train_rows, max_length)
        log(f"  packed into {len(train_rows)} rows of up to {max_length} tokens")
    return train_rows, eval_rows


def build_adapted(recipe: Recipe, base_folder: Path, device, labels: list[str] | None, log=print):
    """The base with the recipe's adapter (seeded), its trainable share logged. -> PeftModel."""
    set_seed(recipe.train.seed)
    model = load_base(base_folder, recipe.model, labels, device=device, seed=recipe.train.seed)
    peft_model = get_peft_model(model, adapter_config(recipe, model, recipe.model.base_name, base_folder))
    trainable, total = peft_model.get_nb_trainable_parameters()
    log(f"model: {recipe.model.base_name} ({type(model).__name__}), adapter {recipe.adapter.method}: "
        f"{trainable:,d} trainable of {total:,d} parameters ({100 * trainable / total:.3f}%)")
    return peft_model


def score(context, model, eval_rows, batch: int, pad: int, label: str, log=print, note: str = "",
          describe=None, **evaluate_kw) -> dict:
    """evaluate() inside `context()` (e.g. the adapter disabled), logged as `label` + the description."""
    if not eval_rows:
        return {}
    with context():
        result = evaluate(model, eval_rows, batch, pad, **evaluate_kw)
    log(label + (describe or describe_eval)(result) + note)
    return result


def best_note(chosen: Path, state) -> str:
    return f"  (adapter of step {state.best_step}, the best evaluation)" if chosen.name == "best" else ""


def write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_summary(output_dir: Path, state, before: dict, after: dict, adapter: Path, started: float,
                  samples: list[dict]) -> dict:
    summary = {"steps": state.step, "skipped_steps": state.bad_steps, "stopped_early": state.stopped_early,
               "best_step": state.best_step,
               "before": before, "after": after, "adapter": str(adapter), "seconds": time.perf_counter() - started,
               "samples": samples}
    write_json(output_dir / "summary.json", summary)
    return summary


def keep_chosen_adapter(output_dir: Path) -> tuple[Path, Path]:
    """Copy the best evaluation's adapter (else the last step's) to output_dir/adapter. -> (chosen, copy)."""
    chosen = output_dir / "best" if (output_dir / "best").is_dir() else output_dir / "checkpoint" / "adapter"
    adapter = output_dir / ADAPTER_DIR
    # a resumed run replaces the adapter/ of its earlier finish: whole, or (disk full) not at all
    replace_atomically(lambda tmp: shutil.copytree(chosen, tmp, dirs_exist_ok=True), adapter)
    return chosen, adapter


def describe_eval(result: dict) -> str:
    text = f"eval loss {result['eval_loss']:.3f}, perplexity {result['eval_ppl']:.2f}"
    if "eval_accuracy" in result:
        text = f"eval accuracy {100 * result['eval_accuracy']:.1f}%, loss {result['eval_loss']:.3f}"
    return text


# -- multi-task -------------------------------------------------------------------------------
@dataclass
class TaskData:
    """One [tasks.<name>] of a recipe, parsed: its head's spec and its records."""

    spec: TaskSpec
    train_records: list[Record]
    eval_records: list[Record]


def parse_task(name: str, task: TaskSection, recipe: Recipe) -> TaskData:
    labels = None
    if task.kind == "classification":
        labels = read_labels(task.labels) if task.labels else [str(i) for i in range(task.num_labels)]
        if task.num_labels is not None and task.num_labels != len(labels):
            raise TaskError(f"[tasks.{name}] num_labels = {task.num_labels}, but {Path(task.labels).name} lists {len(labels)}")
    spec = TaskSpec(task.kind, labels=labels, pooling=task.pooling, weight=task.weight)
    train_records = parse_records(task.train, recipe.data.template, labels, recipe.data.augment, task.kind)
    eval_records = parse_records(task.eval, recipe.data.template, labels, kind=task.kind) if task.eval else []
    return TaskData(spec, train_records, eval_records)


def run_multitask_train(recipe: Recipe, output_dir: Path, resume: bool = False, log=print, overwrite: bool = False) -> dict:
    """`peftcore train` for a recipe with [tasks.<name>] tables: one LoRA backbone, a head per task."""
    from peftcore.models import load_tokenizer

    from peftcore.training import distributed

    started, output_dir = time.perf_counter(), Path(output_dir)
    main = distributed.is_main()
    log = log if main else (lambda *args, **kwargs: None)
    recipe = start_run(recipe, output_dir, resume, overwrite, log)
    # 1. every task's data, parsed and checked before anything loads
    tasks = {name: parse_task(name, task, recipe) for name, task in recipe.tasks.items()}
    # 2. base + tokenizer; 3. rows per task and their data reports
    device = set_runtime(recipe.model)
    base_folder = resolve_base(recipe.model.base_name, log=log)
    tokenizer = load_tokenizer(base_folder)
    pad, batch = pad_id(tokenizer), recipe.train.batch_size
    train_rows, eval_rows = tokenize_tasks(tasks, tokenizer, recipe.data.max_length, output_dir if main else None, log)
    # 4. the shared backbone and the heads; 5. before (the untrained heads on the base)
    model = build_multitask(recipe, base_folder, device, {name: task.spec for name, task in tasks.items()}, log)
    info = {**recipe.to_dict(), "labels": None}
    if main:
        write_recipe(output_dir, info)
    describe = functools.partial(describe_tasks, tasks=tasks)
    before = score(model.backbone.disable_adapter, model, eval_rows, batch, pad, "before: ", log,
                   describe=describe, task_weights=model.task_weights)
    # 6. train
    state = train(model, train_rows, eval_rows, recipe.train, output_dir, pad, resume=resume,
                  save_adapter=lambda folder: save_adapter_folder(model, folder, base_folder, info))
    if not main:
        return {"steps": state.step}
    # 7. the adapter + heads; 8. after, from the files
    chosen, adapter = keep_chosen_adapter(output_dir)
    model = None  # frees the trained copy before the files load
    loaded = MultiTaskModel.from_pretrained(load_base(base_folder, recipe.model, None, device=device), adapter)
    after = score(contextlib.nullcontext, loaded, eval_rows, batch, pad, "after:  ", log, best_note(chosen, state),
                  describe=describe, task_weights=loaded.task_weights)
    samples = multitask_samples(loaded, tokenizer, tasks, recipe, base_folder, device, log)
    summary = write_summary(output_dir, state, before, after, adapter, started, samples)
    log(f"adapter and task heads saved to {adapter}  (metrics: {output_dir / 'metrics.jsonl'})")
    return summary


def tokenize_tasks(tasks: dict[str, TaskData], tokenizer, max_length: int, report_dir: Path | None, log=print):
    """-> (train rows, eval rows), every row stamped with its task; logs and writes each task's data report."""
    train_rows, eval_rows, reports = [], [], {}
    for name, task in tasks.items():
        rows = tokenize_records(task.train_records, tokenizer, max_length, task=name)
        eval_rows += tokenize_records(task.eval_records, tokenizer, max_length, task=name)
        report = data_report(task.train_records, rows, max_length)
        if task.spec.kind != "generation":
            report["trained_tokens"] = len(rows)  # one trained target (a label, a span) per record
        log(f"task {name} ({task.spec.kind}, weight {task.spec.weight:g}, {len(task.eval_records)} eval records)")
        log(format_report(report))
        if task.spec.labels:
            log("  labels: " + ", ".join(f"{label} {sum(r.label == i for r in task.train_records)}"
                                          for i, label in enumerate(task.spec.labels)))
        reports[name] = report
        train_rows += rows
    if report_dir is not None:
        write_report({"tasks": reports}, report_dir)
    return train_rows, eval_rows


def build_multitask(recipe: Recipe, base_folder: Path, device, specs: dict[str, TaskSpec], log=print) -> MultiTaskModel:
    set_seed(recipe.train.seed)
    base = load_base(base_folder, recipe.model, None, device=device, seed=recipe.train.seed)
    task_type = "CAUSAL_LM" if parts_of(base)[2] else "FEATURE_EXTRACTION"  # an encoder has no LM task
    peft_model = get_peft_model(base, adapter_config(recipe, base, recipe.model.base_name, base_folder, task_type))
    model = MultiTaskModel(peft_model, specs)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log(f"model: {recipe.model.base_name}, adapter {recipe.adapter.method} + heads for {', '.join(specs)}: "
        f"{trainable:,d} trainable of {total:,d} parameters ({100 * trainable / total:.3f}%)")
    return model


def describe_tasks(result: dict, tasks: dict[str, TaskData]) -> str:
    parts = []
    for name, task in tasks.items():
        if f"eval_loss/{name}" not in result:  # a task without eval data
            continue
        if task.spec.kind == "classification":
            metric = f"accuracy {100 * result[f'eval_accuracy/{name}']:.1f}%"
        elif task.spec.kind == "qa":
            metric = f"exact match {100 * result[f'eval_exact_match/{name}']:.1f}%"
        else:
            metric = f"perplexity {result[f'eval_ppl/{name}']:.2f}"
        parts.append(f"{name} {metric} (loss {result[f'eval_loss/{name}']:.3f})")
    return "; ".join(parts) + f"; weighted loss {result['eval_loss']:.3f}"


def multitask_samples(model: MultiTaskModel, tokenizer, tasks: dict[str, TaskData], recipe: Recipe, base_folder: Path,
                      device, log=print) -> list[dict]:
    """Sample generations of the first generation task with eval records (the shared adapter + LM head)."""
    name = next((n for n, t in tasks.items() if t.spec.kind == "generation" and t.eval_records), None)
    if name is None or not recipe.eval.samples:
        return []
    loaded = Loaded(model.backbone, tokenizer, {}, base_folder, recipe.model.base_name, device)
    log(f"task {name}:")
    return show_samples(loaded, tasks[name].eval_records[: recipe.eval.samples], recipe.eval, log)


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
