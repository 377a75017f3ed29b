"""TrainConfig: the training loop's settings, one flat dataclass passed whole, checked when built."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from peftcore.data.records import TokenizedExample, group_by_task
from peftcore.training import distributed
from peftcore.training.reporting import check_log_to

SCHEDULES = ("constant", "linear", "cosine")
DEFAULT_MAX_STEPS = 100  # the budget when neither max_steps nor epochs is given


# (test, what the value must be): limits of settings whose impossible values would fail late (after
# the model loads, in torch's words), crash mid-run (log_every 0 divides by zero) or silently train
# nothing. None always passes: it means "unset".
POSITIVE = (lambda v: 0 < v < math.inf, "a finite number > 0")
NON_NEGATIVE = (lambda v: 0 <= v < math.inf, "a finite number >= 0")
COUNT = (lambda v: v >= 1, ">= 1")
OFF_OR_EVERY = (lambda v: v >= 0, ">= 0 (0: off)")
PROBABILITY_BELOW_1 = (lambda v: 0 <= v < 1, "in [0, 1)")
TRAIN_LIMITS = {
    "learning_rate": NON_NEGATIVE, "weight_decay": NON_NEGATIVE,
    "max_grad_norm": (NON_NEGATIVE[0], "a finite number >= 0 (0: no clipping)"),
    "batch_size": COUNT, "grad_accum": COUNT, "max_steps": COUNT, "epochs": POSITIVE,
    "warmup_steps": (OFF_OR_EVERY[0], ">= 0"),
    "eval_every": OFF_OR_EVERY, "log_every": COUNT, "checkpoint_every": OFF_OR_EVERY, "patience": OFF_OR_EVERY,
    "threshold": NON_NEGATIVE, "max_bad_steps": COUNT, "inspect_every": OFF_OR_EVERY,
}


def check_limits(values: dict, limits: dict) -> None:
    """ValueError naming the first of `limits` ({name: (test, what it must be)}) that `values` break."""
    for name, (ok, must) in limits.items():
        value = values.get(name)
        if value is not None and not ok(value):
            raise ValueError(f"{name} must be {must}, got {value!r}")


@dataclass
class TrainConfig:
    learning_rate: float = 1e-4  # AdamW's peak learning rate (after warmup)
    weight_decay: float = 0.01  # AdamW's, on matrices only (norms, biases, DoRA magnitudes, prompts: none)
    max_grad_norm: float | None = 1.0  # None or 0: no clipping
    batch_size: int = 4  # rows per micro-batch (per process under torchrun)
    grad_accum: int = 1  # micro-batches per optimizer step
    # The step budget: max_steps, or epochs (passes over the training rows, fractions allowed) that
    # train() turns into steps (step_budget). Never both: which one would win is a guess. max_steps
    # left None becomes DEFAULT_MAX_STEPS without epochs; with epochs it stays None until train().
    max_steps: int | None = None
    epochs: float | None = None  # passes over the training rows (fractions allowed); excludes max_steps
    lr_schedule: str = "cosine"  # after warmup: constant | linear | cosine decay to 0 at the last step
    warmup_steps: int = 0  # steps of linear warmup from lr / (warmup_steps + 1)
    eval_every: int = 20  # 0: no evaluation during training
    # also evaluate before the first step (the adapter as initialised): step 0 of metrics.jsonl and
    # curve.png, the start every later eval is compared with; not counted by early stopping
    eval_on_start: bool = True
    log_every: int = 1  # a metrics.jsonl line every N steps (eval and inspect steps always)
    # sinks besides metrics.jsonl: "csv" (metrics.csv), "tensorboard" (event files in tensorboard/; the
    # tensorboard extra)
    log_to: list[str] = field(default_factory=list)
    checkpoint_every: int = 0  # 0: only the final checkpoint
    patience: int = 3  # evaluations without improvement before stopping; 0: never stop early
    threshold: float = 0.01  # minimum eval-loss improvement that counts
    max_bad_steps: int = 5  # NaN / inf steps in a row before giving up
    mixed_precision: str = "no"  # "no" | "bf16" | "fp16" (fp16 on CUDA only, with loss scaling)
    gradient_checkpointing: bool = False  # recompute each layer's activations in backward: less memory, ~1.3x time
    # batches of similar lengths (transformers' group_by_length): rows are shuffled, then sorted by length
    # within megabatches of 50 x batch_size, so less of each step is padding (SmolLM2 on the support
    # data: 50-342 tokens a row)
    group_by_length: bool = False
    seed: int = 0  # data order, dropout and adapter init
    progress: bool = True  # the progress bar
    plots: bool = True  # curve.png (+ adapter_norms.png) at the end, when matplotlib is installed
    strategy: str = "auto"  # under torchrun: "ddp" | "fsdp" ("auto": ddp); ignored by a single process
    inspect_every: int = 0  # log per-layer adapter statistics (peftcore.analysis.lowrank) every N steps; 0: never
    # multi-task loss weights (unset: the model's, else 1.0)
    task_weights: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        # None is the sentinel for "max_steps not given": the one way to tell a recipe's explicit
        # max_steps = 100 (ambiguous next to epochs: refused) from the default
        if self.epochs is not None and self.max_steps is not None:
            raise ValueError(f"max_steps={self.max_steps} and epochs={self.epochs} both set: keep one "
                             "(epochs derives the number of steps from the training rows)")
        if self.epochs is None and self.max_steps is None:
            self.max_steps = DEFAULT_MAX_STEPS
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(f"lr_schedule={self.lr_schedule!r}; choose from {', '.join(SCHEDULES)}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision={self.mixed_precision!r}; choose from no, bf16, fp16")
        check_limits(vars(self), TRAIN_LIMITS)
        check_log_to(self.log_to)
        if self.strategy not in distributed.STRATEGIES:
            raise ValueError(f"strategy={self.strategy!r}; choose from {', '.join(distributed.STRATEGIES)}")
        bad = {t: w for t, w in self.task_weights.items()
               if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0)}
        if bad:
            raise ValueError(f"task_weights must be finite numbers >= 0, got {bad}")


def step_budget(config: TrainConfig, rows: list[TokenizedExample], world_size: int = 1) -> int:
    """Optimizer steps the run takes: config.max_steps, or config.epochs passes over `rows`.

    An epoch is what peftcore.training.order walks: ceil(rows / (batch_size x world_size)) micro-batches
    (the last one short, never crossing into the next epoch), grad_accum of them a step; so
    epochs=2 trains every row exactly twice, and epochs=0.5 stops half-way through the first pass.
    Multi-task rows: every step takes grad_accum micro-batches of each drawn task (weight > 0; pass
    the config with the model's weights merged), so the epochs count passes over the largest drawn task
    (smaller tasks repeat theirs more often)."""
    if config.epochs is None:
        return config.max_steps
    groups = group_by_task(rows)
    sizes = [len(task_rows) for task, task_rows in groups.items()
             if float(config.task_weights.get(task, 1.0)) > 0] if groups else [len(rows)]
    if not sizes or max(sizes) == 0:
        raise ValueError(f"epochs={config.epochs} needs training rows: there are none to count the epoch by")
    per_epoch = math.ceil(max(sizes) / (config.batch_size * world_size))  # micro-batches in one pass
    # rounded first: 1.1 epochs of 10 steps is 11.000000000000002 in floats, which must not become 12
    return math.ceil(round(config.epochs * per_epoch / config.grad_accum, 9))
