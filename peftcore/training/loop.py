"""One training loop for every method (LoRA, DoRA, QLoRA, prompt / P- / prefix tuning, classification).

    state = train(model, train_rows, eval_rows, TrainConfig(...), output_dir)

`train_step` does one optimizer update over `grad_accum` micro-batches; `evaluate` scores a split.
Losses are sums over trained tokens divided by the step's trained-token count, so k micro-batches
of b rows update exactly like one batch of k*b rows.

Multi-task rows (TokenizedExample.task set; the model a peftcore.multitask.model.MultiTaskModel): a batch
holds rows of one task and carries "task", which routes it to that task's head. Every step takes
grad_accum rounds of one micro-batch per task (peftcore.training.order). The step's loss is
    sum over tasks t of weight_t * (summed loss of t in the step) / (targets of t in the step)
(targets: trained tokens for generation, rows for classification and qa), so a 4-row
classification batch is not drowned by a 500-token generation batch, and k x b rows still update
exactly like one batch of k*b per task. A task with weight 0 is evaluated but never drawn.

The same loop runs data-parallel under torchrun (`TrainConfig.strategy`: DDP or FSDP2): the count
is then the global one, so n ranks x b rows update exactly like one process with n*b rows. See
peftcore.training.distributed for what changes with more than one process.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from peftcore.analysis.live import AdapterActivations, lora_layers, training_stats
from peftcore.data.records import IGNORE_INDEX, TokenizedExample, collate, group_by_task
from peftcore.models.fused import computes_own_loss as models_computes_own_loss
from peftcore.multitask.heads import Classification, Generation, HeadKind, head_kind
from peftcore.training import distributed
from peftcore.training.config import TrainConfig, step_budget
from peftcore.training.distributed import Parallel
from peftcore.training.hooks import StepHook, step_hooks
from peftcore.training.hooks import after_step as hooks_after_step
from peftcore.training.hooks import extra_loss as hooks_extra_loss
from peftcore.training.order import padding_batch, step_batches, task_weight
from peftcore.training.reporting import Reporter
from peftcore.training.state import CHECKPOINT_DIR, Checkpointer, TrainState, restore_rng, rng_of_rank, set_seed

logger = logging.getLogger(__name__)  # not `log`: train() names its MetricsLog so


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss stayed NaN / inf for too many steps in a row)."""


# -- optimizer and schedule ---------------------------------------------------------------------
def no_decay(name: str, param: nn.Parameter) -> bool:
    """Norm scales, biases, DoRA magnitudes and learned prompt embeddings are not weight-decayed."""
    return param.ndim < 2 or "norm" in name.lower() or "prompt_encoder" in name and ".embedding." in name


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise TrainingError("the model has no trainable parameters: did get_peft_model run?")
    groups = [
        {"params": [p for n, p in params if not no_decay(n, p)], "weight_decay": config.weight_decay},
        {"params": [p for n, p in params if no_decay(n, p)], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.learning_rate)


def lr_factor(step: int, config: TrainConfig) -> float:
    """Multiplier of the base learning rate at `step` (0-based): linear warmup, then the schedule."""
    if step < config.warmup_steps:
        return (step + 1) / (config.warmup_steps + 1)
    progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
    if config.lr_schedule == "linear":
        return max(0.0, 1.0 - progress)
    if config.lr_schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return 1.0


# -- loss -----------------------------------------------------------------------------------------
def loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int, int]:
    """-> (summed loss over trained targets, number of trained targets, number of input tokens).

    A causal LM that computes its own loss (`computes_own_loss`: ours fuse the lm_head with the
    cross-entropy and never hold the (B, T, V) logits) gets `labels=`; other models return logits."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    tokens, targets = int(mask.sum()), trained_targets(batch)
    if route := task_route(batch):  # a multi-task model: the task's head returns its summed loss
        return model(ids, attention_mask=mask, labels=labels, **route), targets, tokens
    if kind_of(batch) is Classification:  # one label per row (IGNORE_INDEX: a padding row)
        return Classification.loss(model(ids, attention_mask=mask), labels), targets, tokens
    if computes_own_loss(model):
        return model(ids, attention_mask=mask, labels=labels), targets, tokens
    logits = model(ids, attention_mask=mask)  # token t predicts token t + 1
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")
    return loss, targets, tokens


def task_route(batch: dict) -> dict:
    """The keyword a MultiTaskModel routes by ({"task": name}), {} for single-task batches: group_by_task
    puts the task's name in every multi-task batch, and only there."""
    return {"task": batch["task"]} if "task" in batch else {}


def computes_own_loss(model: nn.Module) -> bool:
    """Whether forward(..., labels=) returns the summed next-token loss (seen through a DDP wrapper)."""
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return models_computes_own_loss(inner)


def kind_of(batch: dict) -> HeadKind:
    """A multi-task batch names its head kind (collate adds it); a single-task batch is a sequence
    classifier's (one label per row) or a causal LM's (one label per token)."""
    if "kind" in batch:
        return head_kind(batch["kind"])
    return Classification if batch["labels"].ndim == 1 else Generation


def trained_targets(batch: dict) -> int:
    return kind_of(batch).targets(batch["labels"])


def to_device(batch: dict, device: torch.device) -> dict:
    """Tensors to `device`; a task's name stays a string."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def step_targets(micro_batches: list[dict], parallel: Parallel) -> dict[str | None, int]:
    """Trained targets of the step per task (None: single-task batches), summed over ranks, at least 1."""
    local: dict[str | None, int] = {}
    for batch in micro_batches:
        local[batch.get("task")] = local.get(batch.get("task"), 0) + trained_targets(batch)
    return {task: max(1, int(n)) for task, n in zip(local, parallel.sum(list(local.values())))}


def autocast(config: TrainConfig, device: torch.device):
    enabled = config.mixed_precision != "no"
    dtype = torch.float16 if config.mixed_precision == "fp16" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=enabled)


# -- one step ---------------------------------------------------------------------------------
def train_step(model, micro_batches, optimizer, config: TrainConfig, scaler=None,
               parallel: Parallel | None = None, hooks: list[StepHook] = ()) -> dict:
    """One update over micro-batches. -> {"loss", "grad_norm", "tokens", "skipped"}, and "task_losses"
    ({task: its mean loss in the step}) for multi-task batches.

    Each task's summed loss is divided by the task's trained-target count in the step and weighted by
    config.task_weights (single-task batches: one group of weight 1; weight-0 batches are skipped).
    `parallel` (from distributed.wrap_model) runs the forwards through DDP / FSDP; the counts are
    then global, and so are the returned losses and tokens. `hooks`' extra losses (training.hooks) join the
    first micro-batch's backward once per step, unscaled: DDP averages their identical gradients over ranks."""
    parallel = parallel or distributed.single(model)
    device = parallel.trainable[0].device
    micro_batches = [b for b in micro_batches if task_weight(config, b.get("task")) > 0]
    counts = step_targets(micro_batches, parallel)
    optimizer.zero_grad(set_to_none=True)
    step_loss, tokens, task_losses = 0.0, 0, dict.fromkeys(counts, 0.0)
    extra = hooks_extra_loss(hooks)  # the parameters do not change within a step: once is PEFT's every forward
    for i, batch in enumerate(micro_batches):
        task, weight = batch.get("task"), task_weight(config, batch.get("task"))
        batch = to_device(batch, device)
        with parallel.accumulating(last=i == len(micro_batches) - 1):
            with autocast(config, device):
                loss, _, n_tokens = loss_sum(parallel.module, batch)
            scaled = loss * parallel.loss_scale * weight / counts[task]  # weight 1.0: bit-identical to no weight
            scaled = scaled + extra if i == 0 and extra is not None else scaled
            (scaler.scale(scaled) if scaler else scaled).backward()
        mean = float(loss.detach()) / counts[task]
        step_loss += weight * mean
        task_losses[task] += mean
        tokens += n_tokens
    parallel.finish_grads()
    step_loss, tokens, *per_task = parallel.sum([step_loss, tokens, *task_losses.values()])
    tokens = int(tokens)
    task_losses = {task: value for task, value in zip(task_losses, per_task) if task is not None}
    if scaler:
        scaler.unscale_(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm or float("inf")))
    if not (math.isfinite(step_loss) and math.isfinite(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        if scaler:
            scaler.update()
        return {"loss": step_loss, "grad_norm": grad_norm, "tokens": tokens, "skipped": True,
                "task_losses": task_losses}
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return {"loss": step_loss, "grad_norm": grad_norm, "tokens": tokens, "skipped": False, "task_losses": task_losses,
            "extra_loss": None if extra is None else float(extra.detach())}


@torch.no_grad()
def evaluate(model, rows: list[TokenizedExample], batch_size: int, pad_token_id: int, parallel: Parallel | None = None,
             task_weights: dict[str, float] | None = None) -> dict:
    """Token-weighted loss and perplexity (accuracy too, for classification) on a split.

    Multi-task rows: per task eval_loss/<task> (and eval_ppl/<task> for generation,
    eval_accuracy/<task> for classification, eval_exact_match/<task> for qa); eval_loss is then the
    sum of the task losses weighted by `task_weights` (1.0 when unset): what early stopping watches."""
    groups = group_by_task(rows)
    if not groups:
        return evaluate_split(model, rows, batch_size, pad_token_id, parallel)
    result, weights = {}, task_weights or {}
    for task, task_rows in groups.items():
        scores = evaluate_split(model, task_rows, batch_size, pad_token_id, parallel)
        if head_kind(task_rows[0].kind) is not Generation:
            del scores["eval_ppl"]
        result.update({f"{key}/{task}": value for key, value in scores.items()})
    result["eval_loss"] = sum(weights.get(task, 1.0) * result[f"eval_loss/{task}"] for task in groups)
    return result


@torch.no_grad()
def evaluate_split(model, rows: list[TokenizedExample], batch_size: int, pad_token_id: int,
                   parallel: Parallel | None = None) -> dict:
    """One task's rows (or single-task rows): loss per target, perplexity, accuracy / exact match.

    With a multi-process `parallel` each rank scores rows[rank::world_size] and the sums are
    all-reduced (every rank runs the same number of forwards: FSDP gathers weights in each)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    mine, n_batches = rows, math.ceil(len(rows) / batch_size)
    if parallel is not None and parallel.world_size > 1:
        mine = rows[parallel.rank :: parallel.world_size]
        n_batches = math.ceil(math.ceil(len(rows) / parallel.world_size) / batch_size)
    total, count, correct = 0.0, 0, 0
    for i in range(n_batches):
        chunk = mine[i * batch_size : (i + 1) * batch_size]
        batch = collate(chunk, pad_token_id) if chunk else padding_batch(rows, pad_token_id)
        loss, n, right = score_batch(model, to_device(batch, device))
        total, count, correct = total + loss, count + n, correct + right
    if parallel is not None:
        total, count, correct = parallel.sum([total, count, correct])
    model.train(was_training)
    result = {"eval_loss": total / max(count, 1)}
    result["eval_ppl"] = math.exp(min(result["eval_loss"], 50.0))
    kind = head_kind(rows[0].kind) if rows else Generation
    if kind.metric is not None:
        result[kind.metric] = correct / len(rows)
    return result


def score_batch(model, batch: dict) -> tuple[float, int, int]:
    """-> (summed loss, targets, correct predictions) of one eval batch, from one forward."""
    labels = batch["labels"]
    kind = kind_of(batch)
    if kind is Generation:
        loss, n, _ = loss_sum(model, batch)
        return float(loss), n, 0
    outputs = model(batch["input_ids"], attention_mask=batch["attention_mask"], **task_route(batch))
    return float(kind.loss(outputs, labels)), kind.targets(labels), kind.correct(outputs, labels)


# -- the loop -----------------------------------------------------------------------------------
def enable_gradient_checkpointing(model: nn.Module) -> None:
    found = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
    if not found:
        raise TrainingError(f"{type(model).__name__} has no gradient_checkpointing switch")
    for module in found:
        module.gradient_checkpointing = True


def train(model, train_rows, eval_rows, config: TrainConfig, output_dir, pad_token_id: int = 0,
          resume: bool = False, save_adapter=None, callbacks=()) -> TrainState:
    """Train until max_steps (or `config.epochs` over train_rows: step_budget) or early stopping; checkpoints,
    metrics.jsonl (+ config.log_to's sinks) and the best adapter go to output_dir. `callbacks`: objects with
    any of on_step / on_eval / on_log / on_save / on_end (peftcore.training.reporting), e.g. to stop the run.

    Under torchrun (several processes) every rank calls this with the same arguments; the model is
    wrapped per `config.strategy` and rank 0 writes the files. Every rank returns once the final
    checkpoint is on disk. With strategy "fsdp" the model stays sharded afterwards: load the adapter
    from output_dir for further use."""
    output_dir = Path(output_dir)
    distributed.setup()
    rank, world = distributed.rank(), distributed.world_size()
    set_seed(config.seed + rank)  # rank 0: the single-process seed; other ranks draw other dropout masks
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    parallel = distributed.wrap_model(model, config.strategy)
    # final before the schedule is built: its lambda reads config.max_steps (the derived budget with epochs)
    config = with_step_budget(checked_config(config, model, parallel, train_rows), train_rows, world, parallel)
    hooks = step_hooks(model)
    check_hooks(hooks, parallel)
    optimizer = build_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))
    check_precision(config.mixed_precision, parallel.trainable[0].device)
    scaler = torch.amp.GradScaler("cuda") if config.mixed_precision == "fp16" else None
    checkpointer = Checkpointer(output_dir, model, save_adapter or model.save_pretrained, rank=rank, world_size=world,
                                settle=parallel.settle, hooks=hooks)
    state = checkpointer.load(optimizer, scheduler) if resume else TrainState(world_size=world)
    if resume:
        restore_rng(rng_of_rank(state.rng, rank))
    report = Reporter(config, output_dir, parallel.is_main, state.step, state.step if resume else None, callbacks)
    model.train()
    evaluating = bool(config.eval_every and eval_rows)
    if evaluating and config.eval_on_start and state.step == 0:
        report.evaluated_at_start(state, evaluate(model, eval_rows, config.batch_size, pad_token_id, parallel,
                                                  config.task_weights))
    steps = step_batches(train_rows, state, config, pad_token_id, rank, world)
    while state.step < config.max_steps and not state.stopped_early:
        record = run_step(model, next(steps), optimizer, scheduler, config, state, scaler, parallel, hooks)
        if evaluating and (state.step % config.eval_every == 0 or state.step == config.max_steps):
            record.update(evaluate(model, eval_rows, config.batch_size, pad_token_id, parallel, config.task_weights))
            if note_eval(state, record, config, checkpointer):
                report.saved(state, output_dir / "best")
        report.stepped(state, record)
        if config.checkpoint_every and state.step % config.checkpoint_every == 0:
            save_checkpoint(checkpointer, state, optimizer, scheduler, report)
    save_checkpoint(checkpointer, state, optimizer, scheduler, report)
    report.ended(state)
    distributed.barrier()  # the final checkpoint is on disk before any rank returns
    return state


def save_checkpoint(checkpointer: Checkpointer, state: TrainState, optimizer, scheduler, report: Reporter) -> None:
    checkpointer.save(state, optimizer, scheduler)
    report.saved(state, checkpointer.output_dir / CHECKPOINT_DIR)


def checked_config(config: TrainConfig, model, parallel: Parallel, train_rows: list[TokenizedExample]) -> TrainConfig:
    """Refuse what cannot run; multi-task weights not set in the config come from the model's task specs."""
    if config.inspect_every and parallel.strategy == "fsdp":
        raise TrainingError(
            "inspect_every needs whole adapter weights on rank 0: use strategy 'ddp' or inspect_every=0")
    groups = group_by_task(train_rows)
    if not groups:
        return config
    config = replace(config, task_weights={**getattr(model, "task_weights", {}), **config.task_weights})
    if all(task_weight(config, task) == 0 for task in groups):
        raise TrainingError(f"every task ({', '.join(groups)}) has weight 0: nothing to train")
    return config


def check_hooks(hooks: list[StepHook], parallel: Parallel) -> None:
    if hooks and parallel.strategy == "fsdp":
        raise TrainingError(f"{type(hooks[0]).__name__} (AdaLoRA's rank schedule) reads whole adapter weights and "
                            "gradients on every rank: use strategy 'ddp' or 'single'")


def with_step_budget(config: TrainConfig, train_rows: list[TokenizedExample], world: int,
                     parallel: Parallel) -> TrainConfig:
    """`config` with max_steps set: epochs, when given, become steps over these rows (step_budget). A resumed
    run derives the same number from the same rows, so it stops where the uninterrupted one would."""
    if config.epochs is None:
        return config
    try:
        steps = step_budget(config, train_rows, world)
    except ValueError as e:
        raise TrainingError(str(e)) from None
    if parallel.is_main:
        by = " (counted by the largest task)" if group_by_task(train_rows) else ""
        logger.info("epochs=%g -> max_steps=%d: %d training rows, batch_size %d x grad_accum %d x %d process(es) "
                 "a step%s", config.epochs, steps, len(train_rows), config.batch_size, config.grad_accum, world, by)
    return replace(config, epochs=None, max_steps=steps)


def check_precision(mixed_precision: str, device: torch.device) -> None:
    """fp16 needs loss scaling, which torch's GradScaler does on CUDA only; bf16 needs hardware support."""
    if mixed_precision == "fp16" and device.type != "cuda":
        raise TrainingError(f"mixed_precision 'fp16' needs a CUDA device (the model is on {device.type}); "
                            "use 'bf16' or 'no'")
    if mixed_precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise TrainingError(f"mixed_precision 'bf16': {torch.cuda.get_device_name(device)} has no bf16; use 'fp16'")


def run_step(model, micro_batches, optimizer, scheduler, config: TrainConfig, state: TrainState, scaler,
             parallel: Parallel, hooks: list[StepHook] = ()) -> dict:
    """train_step, then the bookkeeping around it -> the step's metrics.jsonl record (no eval yet)."""
    started = time.perf_counter()
    inspecting = bool(config.inspect_every) and (state.step + 1) % config.inspect_every == 0 and parallel.is_main
    watch = AdapterActivations(model) if inspecting and lora_layers(model) else None
    with watch or contextlib.nullcontext():
        metrics = train_step(model, micro_batches, optimizer, config, scaler, parallel=parallel, hooks=hooks)
    check_bad_steps(state, metrics, config)
    hooked = {} if metrics["skipped"] else hooks_after_step(hooks, state.step)  # before zero_grad: reads .grad
    lr = optimizer.param_groups[0]["lr"]
    with warnings.catch_warnings():  # a skipped step still advances the schedule; torch warns about that
        warnings.simplefilter("ignore", UserWarning)
        scheduler.step()
    state.step += 1
    record = {"step": state.step, "loss": metrics["loss"], "lr": lr, "grad_norm": metrics["grad_norm"],
              "tokens_per_s": metrics["tokens"] / max(time.perf_counter() - started, 1e-9)}
    record.update({f"loss/{task}": loss for task, loss in metrics["task_losses"].items()})
    if metrics.get("extra_loss") is not None:
        record["extra_loss"] = metrics["extra_loss"]  # e.g. AdaLoRA's weighted orthogonality penalty
    record.update(hooked)
    if metrics["skipped"]:
        record["skipped_steps"] = state.bad_steps  # NaN/inf steps so far, this one included
    if inspecting:
        record["adapter_stats"] = training_stats(model, watch.summary() if watch else None)
    return record


def check_bad_steps(state: TrainState, metrics: dict, config: TrainConfig) -> None:
    if not metrics["skipped"]:
        state.bad_in_a_row = 0
        return
    state.bad_steps += 1
    state.bad_in_a_row += 1
    if state.bad_in_a_row >= config.max_bad_steps:
        raise TrainingError(
            f"loss or gradients were NaN/inf for {state.bad_in_a_row} steps in a row (step {state.step + 1}); "
            "lower the learning rate, use fp32 or bf16 instead of fp16, or check the data"
        )


def note_eval(state: TrainState, record: dict, config: TrainConfig, checkpointer: Checkpointer) -> bool:
    """Early stopping: an eval counts as better only if it beats the best by more than `threshold`.
    -> whether it did (the best adapter was then saved)."""
    loss = record["eval_loss"]
    if state.best_eval_loss is None or state.best_eval_loss - loss > config.threshold:
        state.best_eval_loss, state.best_step, state.evals_without_improvement = loss, state.step, 0
        checkpointer.save_best()
        return True
    state.evals_without_improvement += 1
    if config.patience and state.evals_without_improvement >= config.patience:
        state.stopped_early = True
    return False
