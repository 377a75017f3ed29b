"""`peftcore train`: a recipe in, an adapter folder out, with what a practitioner checks printed.

Order matters: the data is read and checked first (a bad line fails in a second, before any
model loads), then the base and its tokenizer, the data report, the perplexity (or accuracy)
before training, the one training loop (`peftcore.training.loop.train`), and finally the saved adapter
is loaded back from disk to measure "after" and show sample generations, so the numbers printed
are the numbers of the files written.

One pipeline: a recipe's tasks are its [tasks.<name>] tables, or (a single-task recipe) its [data] as one
task named None. Per task: data, rows, before / after metrics; a multi-task job trains one MultiTaskModel
(peftcore.multitask) on all tasks at once, and its adapter folder holds the LoRA adapter plus the task heads.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

from peftcore.data.records import pack
from peftcore.data.report import data_report, format_report, write_report
from peftcore.jobs import run_folder
from peftcore.jobs.adapter_folder import Loaded, backbone, load_adapter_folder, save_adapter_folder, task_weights
from peftcore.jobs.bases import (
    TaskError,
    adapter_config,
    base_chat_template,
    load_base,
    loftq_first,
    quantize_after_loftq,
    resolve_base,
    set_runtime,
)
from peftcore.jobs.generate import show_samples, trained_instructions
from peftcore.jobs.recipe import Recipe, TaskSection
from peftcore.jobs.tasks import Record, pad_id, parse_records, read_labels, tokenize_records
from peftcore.multitask.heads import Classification, Generation, HeadKind, TaskSpec, head_kind
from peftcore.multitask.model import MultiTaskModel, parts_of
from peftcore.peft_model import get_peft_model
from peftcore.training.config import step_budget
from peftcore.training.loop import check_precision, evaluate, train
from peftcore.training.state import replace_atomically, set_seed

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"


def default_output_dir(resume: bool) -> Path:
    runs = Path("runs")
    if resume:
        candidates = sorted(p for p in runs.glob("*") if (p / "checkpoint").is_dir() and not p.is_symlink()
                            ) if runs.is_dir() else []
        if not candidates:
            raise FileNotFoundError("--resume: no run with a checkpoint under runs/; pass --output-dir")
        return candidates[-1]
    return runs / datetime.now().strftime("%Y%m%d-%H%M%S")


def point_latest(output_dir: Path) -> None:
    """runs/latest -> the run just started, for runs in the default runs/ folder (`peftcore eval --adapter
    runs/latest/adapter`). Replaced atomically; where links cannot be made (some Windows setups), none."""
    runs = Path("runs").resolve()
    if output_dir.resolve().parent != runs:
        return
    link, temporary = runs / "latest", runs / f".latest-{os.getpid()}"
    try:
        temporary.unlink(missing_ok=True)
        temporary.symlink_to(output_dir.name, target_is_directory=True)
        os.replace(temporary, link)
    except OSError:
        temporary.unlink(missing_ok=True)


def run_train(recipe: Recipe, output_dir: Path, resume: bool = False, overwrite: bool = False) -> dict:
    """overwrite: start afresh in a folder that holds a run (run_folder.prepare); resume: continue it.

    One pipeline for every recipe: a single-task recipe is a one-task job (its task named None)."""
    from peftcore.models import load_tokenizer
    from peftcore.training import distributed

    started, output_dir = time.perf_counter(), Path(output_dir)
    main = distributed.is_main()  # under torchrun only rank 0 prints and writes files
    recipe = start_run(recipe, output_dir, resume, overwrite)
    # 1. the data, every task's, parsed and checked before anything loads
    tasks = job_tasks(recipe)
    # 2. base + tokenizer; 3. tokens and the data report(s)
    device = set_runtime(recipe.model)
    check_precision(recipe.train.mixed_precision, device)  # before minutes of loading and the "before" eval
    base_folder = resolve_base(recipe.model.base_name)
    tokenizer = load_tokenizer(base_folder)
    pad, batch = pad_id(tokenizer), recipe.train.batch_size
    train_rows, eval_rows = tokenize_tasks(tasks, tokenizer, recipe.data.max_length, output_dir if main else None,
                                           packing=recipe.data.packing)
    # 4. model + adapter (+ task heads); 5. before (the adapter disabled)
    model = build_model(with_schedule_length(recipe, train_rows, distributed.world_size()), base_folder, device, tasks)
    info = {**recipe.to_dict(), "labels": tasks[None].labels if None in tasks else None}
    if main:
        write_recipe(output_dir, info)
        point_latest(output_dir)
    describe = functools.partial(describe_scores, tasks=tasks)
    before = score(backbone(model).disable_adapter, model, eval_rows, batch, pad, "before: ",
                   describe=describe, task_weights=task_weights(model))
    # 6. train
    # the adapter's record also keeps the instructions it trained with (generate applies them); the run's
    # recipe.json does not: --resume compares it with the recipe
    adapter_info = {**info, "instructions": trained_instructions(tasks[None].train_records) if None in tasks else {}}
    state = train(model, train_rows, eval_rows, recipe.train, output_dir, pad, resume=resume,
                  save_adapter=lambda folder: save_adapter_folder(model, folder, base_folder, adapter_info, tokenizer))
    if not main:  # rank 0 alone picks, reloads and evaluates the adapter
        return {"steps": state.step}
    # 7. the adapter: the best evaluation's, else the last step's; 8. after, from the files
    chosen, adapter = keep_chosen_adapter(output_dir)
    model = None  # frees the trained copy before the files load
    loaded = load_adapter_folder(adapter)
    after = score(contextlib.nullcontext, loaded.model, eval_rows, batch, pad, "after:  ",
                  best_note(chosen, state), describe=describe, task_weights=loaded.task_weights)
    samples = job_samples(loaded, tasks, recipe.eval)
    summary = write_summary(output_dir, state, before, after, adapter, started, samples)
    if None in tasks:
        log.info(f"adapter saved to {adapter}  "
            f"(metrics: {output_dir / 'metrics.jsonl'}; try: peftcore eval --adapter {adapter})")
    else:
        log.info(f"adapter and task heads saved to {adapter}  (metrics: {output_dir / 'metrics.jsonl'})")
    return summary


def start_run(recipe: Recipe, output_dir: Path, resume: bool, overwrite: bool) -> Recipe:
    """The run folder checked (occupied: refused; resumed: a whole checkpoint, the run's recipe), then the
    recipe as the run uses it: the checkpoint's chat template filled in. Nothing loads before this."""
    run_folder.prepare(output_dir, resume, overwrite)
    recipe = with_checkpoint_chat_template(recipe)
    if resume:
        run_folder.check_same_recipe(recipe, output_dir)
    return recipe


def write_recipe(output_dir: Path, info: dict) -> None:
    """A resumed run keeps the recipe.json it started with (the one later resumes compare against)."""
    path = output_dir / run_folder.RECIPE_FILE
    if not path.exists():
        write_json(path, info)


def with_checkpoint_chat_template(recipe: Recipe) -> Recipe:
    """The base checkpoint's own chat template (chat_template.jinja / tokenizer_config.json / a GGUF file's
    tokenizer.chat_template) renders chat records, and input/output ones (PromptTemplate.io_as_chat),
    unless the recipe sets one: the adapter then learns the format the model was tuned on. Read before
    any record is parsed, so records are parsed once. The built-in model ships none
    (peftcore.jobs.builtin), and a base that does not resolve is left to fail where it always does,
    after the data checks."""
    template = recipe.data.template
    if template.chat_template or recipe.model.builtin:
        return recipe
    try:
        base = resolve_base(recipe.model.base_name)  # a path or a pip package: a lookup
    except TaskError:
        return recipe
    chat_template, source = base_chat_template(base)
    if not chat_template:
        return recipe
    what = "chat and input/output records" if template.io_as_chat else "chat records"
    log.info(f"{what}: rendered with the checkpoint's chat template ({source})")
    return replace(recipe, data=replace(recipe.data, template=replace(template, chat_template=chat_template)))


def with_schedule_length(recipe: Recipe, train_rows, world: int) -> Recipe:
    """AdaLoRA lays its rank schedule over the run: total_step, unless the recipe sets it, is the run's step count
    (max_steps, or what `epochs` come to). Only the adapter's config holds it; recipe.json keeps the recipe."""
    if recipe.adapter.method != "adalora" or "total_step" in recipe.adapter.options:
        return recipe
    steps = step_budget(recipe.train, train_rows, world)
    tinit, tfinal = recipe.adapter.options.get("tinit", 0), recipe.adapter.options.get("tfinal", 0)
    if tinit >= steps - tfinal:
        raise TaskError(f"[adapter] tinit = {tinit} and tfinal = {tfinal} leave none of the run's {steps} steps for "
                        "AdaLoRA's budget to fall from init_r to target_r: lower them (e.g. --set adapter.tinit=0 "
                        "--set adapter.tfinal=0) or train longer")
    return replace(recipe, adapter=replace(recipe.adapter, options={**recipe.adapter.options, "total_step": steps}))


def build_model(recipe: Recipe, base_folder: Path, device, tasks: dict):
    """The base with the recipe's adapter (seeded): a PeftModel for a single-task job, else a MultiTaskModel."""
    if None in tasks:
        return build_adapted(recipe, base_folder, device, tasks[None].labels)
    return build_multitask(recipe, base_folder, device, {name: task.spec for name, task in tasks.items()})


def build_adapted(recipe: Recipe, base_folder: Path, device, labels: list[str] | None):
    """The base with the recipe's adapter (seeded), its trainable share logged. -> PeftModel."""
    set_seed(recipe.train.seed)
    dense_first = loftq_first(recipe)  # LoftQ reads the dense weights: the base is quantized after it
    model = load_base(base_folder, recipe.model, labels, device=device, seed=recipe.train.seed,
                      quantize=not dense_first)
    peft_model = get_peft_model(model, adapter_config(recipe, model, recipe.model.base_name, base_folder))
    if dense_first:
        quantize_after_loftq(peft_model, recipe.model)
    trainable, total = peft_model.get_nb_trainable_parameters()
    log.info(f"model: {recipe.model.base_name} ({type(model).__name__}), adapter {recipe.adapter.method}: "
        f"{trainable:,d} trainable of {total:,d} parameters ({100 * trainable / total:.3f}%)")
    return peft_model


def score(context, model, eval_rows, batch: int, pad: int, label: str, note: str = "",
          describe=None, **evaluate_kw) -> dict:
    """evaluate() inside `context()` (e.g. the adapter disabled), logged as `label` + the description."""
    if not eval_rows:
        return {}
    with context():
        result = evaluate(model, eval_rows, batch, pad, **evaluate_kw)
    log.info(label + (describe or describe_eval)(result) + note)
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


def describe_scores(result: dict, tasks: dict) -> str:
    return describe_eval(result) if None in tasks else describe_tasks(result, tasks)


def describe_eval(result: dict) -> str:
    text = f"eval loss {result['eval_loss']:.3f}, perplexity {result['eval_ppl']:.2f}"
    if "eval_accuracy" in result:
        text = f"eval accuracy {100 * result['eval_accuracy']:.1f}%, loss {result['eval_loss']:.3f}"
    return text


# -- the tasks of a job ------------------------------------------------------------------------
@dataclass
class TaskData:
    """One task of a job, parsed: a [tasks.<name>] table, or a single-task recipe's [data] (the job's one task)."""

    head: HeadKind
    labels: list[str] | None  # classification: the class names
    train_records: list[Record]
    eval_records: list[Record]
    spec: TaskSpec | None = None  # a [tasks.<name>] head's spec; None: the recipe's model is the head


def job_tasks(recipe: Recipe) -> dict[str | None, TaskData]:
    """{task name: its data}; a single-task recipe is one task named None (the base's own head)."""
    if recipe.tasks:
        return {name: parse_task(name, task, recipe) for name, task in recipe.tasks.items()}
    labels = read_labels(recipe.data.labels) if recipe.model.task == "SEQ_CLS" else None
    train_records = parse_records(recipe.data.train, recipe.data.template, labels, recipe.data.augment)
    eval_records = parse_records(recipe.data.eval, recipe.data.template, labels) if recipe.data.eval else []
    return {None: TaskData(Generation if labels is None else Classification, labels, train_records, eval_records)}


def parse_task(name: str, task: TaskSection, recipe: Recipe) -> TaskData:
    labels, head = None, head_kind(task.kind)
    if head is Classification:
        labels = read_labels(task.labels) if task.labels else [str(i) for i in range(task.num_labels)]
        if task.num_labels is not None and task.num_labels != len(labels):
            raise TaskError(f"[tasks.{name}] num_labels = {task.num_labels}, "
                            f"but {Path(task.labels).name} lists {len(labels)}")
    spec = TaskSpec(task.kind, labels=labels, pooling=task.pooling, weight=task.weight)
    train_records = parse_records(task.train, recipe.data.template, labels, recipe.data.augment, task.kind)
    eval_records = parse_records(task.eval, recipe.data.template, labels, kind=task.kind) if task.eval else []
    return TaskData(head, labels, train_records, eval_records, spec)


def tokenize_tasks(tasks: dict[str | None, TaskData], tokenizer, max_length: int, report_dir: Path | None,
                   packing: bool = False):
    """-> (train rows, eval rows), every row stamped with its task; logs each task's data report and writes
    them (a single-task job: its one report); packs generation rows if asked."""
    train_rows, eval_rows, reports = [], [], {}
    for name, task in tasks.items():
        rows = tokenize_records(task.train_records, tokenizer, max_length, task=name)
        eval_rows += tokenize_records(task.eval_records, tokenizer, max_length, task=name)
        reports[name] = task_report(name, task, rows, max_length)
        train_rows += rows
    if report_dir is not None:
        write_report(reports[None] if None in tasks else {"tasks": reports}, report_dir)
    if packing and all(task.head is Generation for task in tasks.values()):
        train_rows = pack(train_rows, max_length)
        log.info(f"  packed into {len(train_rows)} rows of up to {max_length} tokens")
    return train_rows, eval_rows


def task_report(name: str | None, task: TaskData, rows, max_length: int) -> dict:
    """One task's data report, logged (a named task: under a line naming it, its kind and weight)."""
    report = data_report(task.train_records, rows, max_length)
    if task.labels is not None:
        report["label_counts"] = {label: sum(r.label == i for r in task.train_records)
                                  for i, label in enumerate(task.labels)}
    if task.head is not Generation:
        report["trained_tokens"] = len(rows)  # one trained target (a label, a span) per record
    if name is not None:
        log.info(f"task {name} ({task.head.name}, weight {task.spec.weight:g}, {len(task.eval_records)} eval records)")
    log.info(format_report(report))
    if task.labels:
        log.info("  labels: " + ", ".join(f"{label} {n}" for label, n in report["label_counts"].items()))
    return report


def build_multitask(recipe: Recipe, base_folder: Path, device, specs: dict[str, TaskSpec]) -> MultiTaskModel:
    set_seed(recipe.train.seed)
    base = load_base(base_folder, recipe.model, None, device=device, seed=recipe.train.seed)
    task_type = "CAUSAL_LM" if parts_of(base)[2] else "FEATURE_EXTRACTION"  # an encoder has no LM task
    peft_model = get_peft_model(base, adapter_config(recipe, base, recipe.model.base_name, base_folder, task_type))
    model = MultiTaskModel(peft_model, specs)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info(f"model: {recipe.model.base_name}, adapter {recipe.adapter.method} + heads for {', '.join(specs)}: "
        f"{trainable:,d} trainable of {total:,d} parameters ({100 * trainable / total:.3f}%)")
    return model


def describe_tasks(result: dict, tasks: dict[str, TaskData]) -> str:
    parts = []
    for name, task in tasks.items():
        if f"eval_loss/{name}" not in result:  # a task without eval data
            continue
        if task.head.metric is not None:
            metric = f"{task.head.metric_words} {100 * result[f'{task.head.metric}/{name}']:.1f}%"
        else:
            metric = f"perplexity {result[f'eval_ppl/{name}']:.2f}"
        parts.append(f"{name} {metric} (loss {result[f'eval_loss/{name}']:.3f})")
    return "; ".join(parts) + f"; weighted loss {result['eval_loss']:.3f}"


def job_samples(loaded: Loaded, tasks: dict[str | None, TaskData], settings) -> list[dict]:
    """Sample generations of the first generation task with eval records (multi-task: the shared adapter + LM head)."""
    names = [n for n, t in tasks.items() if t.head is Generation and t.eval_records]
    if not names or not settings.samples:
        return []
    name = names[0]
    if name is not None:
        log.info(f"task {name}:")
    return show_samples(loaded, tasks[name].eval_records[: settings.samples], settings)
