"""Task heads of a multi-task model: one class per head kind says what it computes from the backbone's
hidden states, what its labels look like, its loss, its targets and its correct predictions.

    Classification  nn.Linear(hidden, num_labels) over one pooled vector per row -> logits (B, num_labels)
    QuestionAnswering  nn.Linear(hidden, 2, bias=False) over every token -> start and end logits (B, T) each
    Generation      no new parameters: the backbone's own LM head (peftcore.multitask.model)

`TaskSpec.kind` is the kind's name as task_heads.json and recipes spell it; `TaskSpec.head` is its class.
Losses are SUMS over what they score (rows for classification and QA, trained tokens for
generation), as the training loop expects: it divides by the step's count per task.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from peftcore.models.fused import IGNORE_INDEX

POOLINGS = ("last", "first", "mean")  # "auto" resolves to last (causal models) or first (encoders)
TASK_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MAX_ANSWER_TOKENS = 30  # a predicted QA span's longest length, as transformers' run_qa (max_answer_length)


class Classification:
    """One class id per row, read from one pooled vector (the last real token of a causal model)."""

    name: ClassVar[str] = "classification"
    metric: ClassVar[str] = "eval_accuracy"
    metric_words: ClassVar[str] = "accuracy"
    labels_are: ClassVar[str] = "one class id per row"

    @staticmethod
    def label_shape(B: int, T: int) -> tuple[int, ...]:
        return (B,)

    @staticmethod
    def new_head(spec: TaskSpec, hidden_size: int) -> nn.Linear:
        head = nn.Linear(hidden_size, spec.num_labels)
        nn.init.zeros_(head.bias)
        return head

    @staticmethod
    def outputs(spec: TaskSpec, head: nn.Linear, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return head(pool(hidden, mask, spec.pooling))  # (B, num_labels)

    @staticmethod
    def loss(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy; rows labelled IGNORE_INDEX (padding rows) add nothing."""
        return F.cross_entropy(outputs.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")

    @staticmethod
    def correct(outputs: torch.Tensor, labels: torch.Tensor) -> int:
        return int((outputs.argmax(-1) == labels).sum())

    @staticmethod
    def targets(labels: torch.Tensor) -> int:
        return int((labels != IGNORE_INDEX).sum())


class QuestionAnswering:
    """The answer's first and last token in the row, from a start and an end logit per token."""

    name: ClassVar[str] = "qa"
    metric: ClassVar[str] = "eval_exact_match"
    metric_words: ClassVar[str] = "exact match"
    labels_are: ClassVar[str] = "start and end token per row"

    @staticmethod
    def label_shape(B: int, T: int) -> tuple[int, ...]:
        return (B, 2)

    @staticmethod
    def new_head(spec: TaskSpec, hidden_size: int) -> nn.Linear:
        # No bias: a constant added to every position's logit cancels in the softmax over positions, so
        # its true gradient is 0, and AdamW would turn the rounding noise in it into full-size steps.
        return nn.Linear(hidden_size, 2, bias=False)

    @staticmethod
    def outputs(spec: TaskSpec, head: nn.Linear, hidden: torch.Tensor, mask: torch.Tensor | None):
        """-> (start, end) logits (B, T) each, padding at the dtype's minimum so no span starts or ends on a pad."""
        start, end = head(hidden).unbind(-1)  # (B, T) each
        if mask is not None:
            pad = mask.to(start.device) == 0
            start = start.masked_fill(pad, torch.finfo(start.dtype).min)
            end = end.masked_fill(pad, torch.finfo(end.dtype).min)
        return start, end

    @staticmethod
    def loss(outputs, labels: torch.Tensor) -> torch.Tensor:
        """Per row (CE(start) + CE(end)) / 2, as transformers' QA models (summed here, not averaged)."""
        start, end = outputs
        start_loss = F.cross_entropy(start.float(), labels[:, 0], ignore_index=IGNORE_INDEX, reduction="sum")
        end_loss = F.cross_entropy(end.float(), labels[:, 1], ignore_index=IGNORE_INDEX, reduction="sum")
        return (start_loss + end_loss) / 2

    @staticmethod
    def correct(outputs, labels: torch.Tensor) -> int:
        """Exact match: the best valid span's first and last token both right."""
        return int((best_spans(*outputs) == labels).all(-1).sum())

    @staticmethod
    def targets(labels: torch.Tensor) -> int:
        return int((labels[:, 0] != IGNORE_INDEX).sum())


class Generation:
    """Next-token prediction through the backbone's own LM head: the loss is the causal LM loss."""

    name: ClassVar[str] = "generation"
    metric: ClassVar[None] = None  # perplexity, from the loss
    metric_words: ClassVar[str] = "perplexity"
    labels_are: ClassVar[str] = "one label per token"

    @staticmethod
    def label_shape(B: int, T: int) -> tuple[int, ...]:
        return (B, T)

    @staticmethod
    def new_head(spec: TaskSpec, hidden_size: int) -> None:
        return None

    @staticmethod
    def targets(labels: torch.Tensor) -> int:
        return int((labels[:, 1:] != IGNORE_INDEX).sum())  # the last token predicts nothing


HeadKind = type[Classification] | type[QuestionAnswering] | type[Generation]
HEAD_KINDS: dict[str, HeadKind] = {kind.name: kind for kind in (Classification, Generation, QuestionAnswering)}
KINDS = tuple(HEAD_KINDS)


def head_kind(name: str) -> HeadKind:
    """The class of a kind spelled as in files and recipes ("classification", "generation", "qa")."""
    if name not in HEAD_KINDS:
        raise ValueError(f"kind {name!r}; choose from {', '.join(KINDS)}")
    return HEAD_KINDS[name]


@dataclass
class TaskSpec:
    """One task: its head kind, labels (classification), pooling and loss weight; task_heads.json holds these."""

    kind: str
    num_labels: int | None = None  # classification
    labels: list[str] | None = None  # classification: names of the classes, index = class id
    pooling: str = "auto"  # classification: last | first | mean | auto
    weight: float = 1.0  # the task's loss weight in training (TrainConfig.task_weights)
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        head_kind(self.kind)
        if self.labels is not None:
            self.labels = list(self.labels)
            if self.num_labels is not None and self.num_labels != len(self.labels):
                raise ValueError(f"num_labels {self.num_labels} but {len(self.labels)} labels")
            self.num_labels = len(self.labels)
        if self.head is Classification and (self.num_labels is None or self.num_labels < 2):
            raise ValueError("a classification task needs num_labels >= 2 (or a list of labels)")
        if self.head is not Classification and (self.num_labels is not None or self.pooling != "auto"):
            raise ValueError(f"num_labels / labels / pooling are for classification tasks, not {self.kind}")
        if self.pooling not in (*POOLINGS, "auto"):
            raise ValueError(f"pooling {self.pooling!r}; choose from {', '.join(POOLINGS)}, auto")
        if not (math.isfinite(self.weight) and self.weight >= 0):
            raise ValueError(f"weight must be a finite number >= 0, got {self.weight}")

    @property
    def head(self) -> HeadKind:
        return HEAD_KINDS[self.kind]

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("extra")
        return {**self.extra, **d}

    @classmethod
    def from_dict(cls, d: dict) -> TaskSpec:
        known = {"kind", "num_labels", "labels", "pooling", "weight"}
        return cls(**{k: v for k, v in d.items() if k in known}, extra={k: v for k, v in d.items() if k not in known})


def check_task_name(name: str) -> None:
    """Task names become module names (heads.<task>) and metric keys (loss/<task>)."""
    if not isinstance(name, str) or not TASK_NAME.fullmatch(name):
        raise ValueError(f"task name {name!r}: use letters, digits and _ (not starting with a digit)")
    if hasattr(nn.ModuleDict(), name):
        raise ValueError(f"task name {name!r} is taken by nn.ModuleDict's own attributes; pick another name")


def build_head(spec: TaskSpec, hidden_size: int, std: float) -> nn.Linear | None:
    """A new head, initialised as transformers initialises score / qa_outputs heads (normal std, zero bias):
    logits start near 0, so the untrained head predicts (nearly) uniformly."""
    head = spec.head.new_head(spec, hidden_size)
    if head is not None:
        nn.init.normal_(head.weight, std=std)
    return head


def check_labels(task: str, spec: TaskSpec, labels: torch.Tensor, input_ids: torch.Tensor) -> None:
    expected = spec.head.label_shape(*input_ids.shape[:2])
    if tuple(labels.shape) != expected:
        raise ValueError(f"task {task!r} ({spec.kind}) takes labels {expected} ({spec.head.labels_are}), "
                         f"got {tuple(labels.shape)}")


# -- pooling and span decoding ------------------------------------------------------------------
def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) 0/1 -> position ids counting real tokens only: left padding then gives every row the
    positions it has unpadded (what generate() does), for absolute-position models too."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def pool(hidden: torch.Tensor, mask: torch.Tensor | None, how: str) -> torch.Tensor:
    """(B, T, H) -> (B, H): the last or first real token (left or right padding alike), or their mean."""
    B, T, _ = hidden.shape
    if mask is None:
        mask = torch.ones(B, T, dtype=torch.long, device=hidden.device)
    mask = mask.to(hidden.device)
    if how == "mean":
        weights = mask.to(hidden.dtype)[..., None]  # (B, T, 1)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
    first = mask.argmax(-1)  # argmax returns the first maximal index
    index = first if how == "first" else T - 1 - mask.flip(-1).argmax(-1)
    return hidden[torch.arange(B, device=hidden.device), index]


def best_spans(start: torch.Tensor, end: torch.Tensor, max_answer_tokens: int = MAX_ANSWER_TOKENS) -> torch.Tensor:
    """(B, T) start / end logits -> (B, 2) [first, last] token of the span with the highest start + end
    logit among spans with first <= last < first + max_answer_tokens. Two separate argmaxes can end
    before they start; this decode never does. Cost O(B T L), never (B, T, T)."""
    T = start.shape[-1]
    L = min(max_answer_tokens, T)
    start, end = start.float(), end.float()
    # ends[b, i, d] = end logit of token i + d (-inf past the row's end)
    ends = torch.stack([F.pad(end[:, d:], (0, d), value=-math.inf) for d in range(L)], -1)  # (B, T, L)
    best = (start[:, :, None] + ends).flatten(1).argmax(-1)  # (B,) over (first, length - 1) pairs
    first = best // L
    return torch.stack([first, first + best % L], -1)
