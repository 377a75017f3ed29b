"""Step hooks: what a method adds to the one training loop, instead of a loop of its own.

A model that has hooks returns them from `model.step_hooks()` (PeftModel: its trained adapters' methods; AdaLoRA's
RankAllocator is one). Per optimizer step the loop
  1. adds each hook's `extra_loss()` to the step's loss once (AdaLoRA: the orthogonality penalty), and
  2. after optimizer.step(), gradients still in .grad, calls `after_step(step)` with the 0-based step (AdaLoRA:
     the importance update and the rank masks); what it returns goes into the step's metrics record.
`state_dict()` / `load_state_dict()` travel in the training checkpoint, so a resumed run continues the same.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class StepHook(Protocol):
    def extra_loss(self) -> torch.Tensor | None: ...
    def after_step(self, step: int) -> dict: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


def step_hooks(model: nn.Module) -> list[StepHook]:
    hooks = getattr(model, "step_hooks", None)
    return list(hooks()) if callable(hooks) else []


def extra_loss(hooks: list[StepHook]) -> torch.Tensor | None:
    """The sum of the hooks' extra losses (None: nothing to add)."""
    terms = [t for t in (hook.extra_loss() for hook in hooks) if t is not None]
    return torch.stack([t.float() for t in terms]).sum() if terms else None


def after_step(hooks: list[StepHook], step: int) -> dict:
    record = {}
    for hook in hooks:
        record.update(hook.after_step(step))
    return record
