"""A multi-task model: one LoRA-adapted backbone shared by named task heads, routed per batch.

    model = MultiTaskModel(get_peft_model(base, LoraConfig(...)), {
        "intent": TaskSpec("classification", labels=["billing", "restore", ...]),
        "support": TaskSpec("generation"),
        "span": TaskSpec("qa")})
    logits = model(ids, attention_mask=mask, task="intent")               # (B, num_labels)
    loss = model(ids, attention_mask=mask, task="support", labels=labels)  # summed next-token loss
    model.save_pretrained(dir); MultiTaskModel.from_pretrained(base, dir)

The backbone is a PeftModel with LoRA over a causal Llama-family / GPT-2 model (every kind) or a
BERT encoder (classification and qa). Heads read the backbone's final hidden states (its inner
decoder / encoder module, under the same LoRA layers); generation runs the whole backbone, so it is
exactly what single-task training computes. The folder holds the adapter in HF PEFT's format
(loadable alone by HF PEFT or PeftModel.from_pretrained) plus task_heads.safetensors (keys
`heads.<task>.weight`, and `.bias` for classification) and task_heads.json (task -> kind, labels,
pooling, weight).
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from peftcore.models import BertForSequenceClassification, BertModel, GPT2LMHeadModel, LlamaForCausalLM, safetensors_io
from peftcore.models.fused import IGNORE_INDEX, causal_lm_loss, computes_own_loss
from peftcore.multitask.heads import (
    Classification,
    Generation,
    TaskSpec,
    build_head,
    check_labels,
    check_task_name,
    positions_from_mask,
)
from peftcore.peft_model import PeftModel

HEADS_WEIGHTS = "task_heads.safetensors"
HEADS_CONFIG = "task_heads.json"
HEADS_FORMAT = 1


def parts_of(model: nn.Module) -> tuple[nn.Module, nn.Module | None, bool]:
    """-> (the module that returns the final hidden states (B, T, H), the LM head or None, causal?)."""
    if isinstance(model, LlamaForCausalLM):
        return model.model, model.lm_head, True
    if isinstance(model, GPT2LMHeadModel):
        return model.transformer, model.lm_head, True
    if isinstance(model, BertModel):
        return model, None, False
    if isinstance(model, BertForSequenceClassification):
        return model.bert, None, False
    raise TypeError(f"MultiTaskModel supports Llama-family, GPT-2 and BERT backbones, not {type(model).__name__}")


def hidden_size_of(model: nn.Module) -> int:
    config = model.config
    return getattr(config, "hidden_size", None) or config.n_embd


class MultiTaskModel(nn.Module):
    def __init__(self, backbone: PeftModel, tasks: dict[str, TaskSpec]):
        super().__init__()
        if not isinstance(backbone, PeftModel) or backbone.is_prompt_learning:
            raise TypeError("MultiTaskModel shares a LoRA PeftModel between its heads: "
                            "pass get_peft_model(base, LoraConfig(...))")
        if not tasks:
            raise ValueError("MultiTaskModel needs at least one task")
        _, lm_head, causal = parts_of(backbone.model)
        self.backbone = backbone
        self.specs: dict[str, TaskSpec] = {}
        self.heads = nn.ModuleDict()
        # Heads take the adapter's dtype and device (a bf16 or quantized base keeps float32 adapters)
        reference = next((p for n, p in backbone.named_parameters() if ".lora_" in n), next(backbone.parameters()))
        std = getattr(backbone.model.config, "initializer_range", 0.02)
        for name, spec in tasks.items():
            check_task_name(name)
            if spec.head is Generation and lm_head is None:
                raise ValueError(f"task {name!r}: generation needs a model with an LM head; "
                                 f"{type(backbone.model).__name__} has none")
            if spec.head is Classification and spec.pooling == "auto":
                spec = replace(spec, pooling="last" if causal else "first")  # the token that has read the whole row
            self.specs[name] = spec
            head = build_head(spec, hidden_size_of(backbone.model), std)
            if head is not None:
                self.heads[name] = head.to(device=reference.device, dtype=reference.dtype)

    @property
    def tasks(self) -> list[str]:
        return list(self.specs)

    @property
    def peft_config(self) -> dict:
        """The backbone's adapter configs; peftcore.training.distributed reads them to keep every tensor an adapter
        file holds (e.g. a targeted lm_head's weight) whole on each rank under fsdp."""
        return self.backbone.peft_config

    @property
    def task_weights(self) -> dict[str, float]:
        return {name: spec.weight for name, spec in self.specs.items()}

    def spec_of(self, task: str) -> TaskSpec:
        if task not in self.specs:
            raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(self.specs)}")
        return self.specs[task]

    # -- running ------------------------------------------------------------------------------------
    def forward(self, input_ids, attention_mask=None, *, task: str, labels=None):
        """Without labels: logits (B, T, vocab) for generation, (B, num_labels) for classification,
        (start, end) logits (B, T) each for qa. With labels: the task's summed loss (fp32 scalar)."""
        spec = self.spec_of(task)
        if labels is not None:
            check_labels(task, spec, labels, input_ids)
        if spec.head is Generation:
            return self.generation(input_ids, attention_mask, labels)
        head = self.heads[task]
        # a bf16 base under a float32 head (autocast casts back as it likes)
        hidden = self.hidden_states(input_ids, attention_mask).to(head.weight.dtype)
        outputs = spec.head.outputs(spec, head, hidden, attention_mask)
        return outputs if labels is None else spec.head.loss(outputs, labels)

    def hidden_states(self, input_ids, attention_mask=None) -> torch.Tensor:
        """The backbone's final hidden states (B, T, H), through its LoRA layers."""
        inner, _, _ = parts_of(self.backbone.model)
        positions = None if attention_mask is None else positions_from_mask(attention_mask)
        return inner(input_ids, attention_mask=attention_mask, position_ids=positions)

    def generation(self, input_ids, attention_mask, labels):
        """The whole backbone, as a single-task run calls it (its fused labels= loss when it has one)."""
        if labels is None:
            return self.backbone(input_ids, attention_mask=attention_mask)
        if computes_own_loss(self.backbone.model):
            return self.backbone(input_ids, attention_mask=attention_mask, labels=labels)
        inner, lm_head, _ = parts_of(self.backbone.model)
        return causal_lm_loss(lm_head, inner(input_ids, attention_mask=attention_mask), labels, IGNORE_INDEX)

    def generate(self, input_ids, **kwargs) -> torch.Tensor:
        """Decoding with the shared adapter and the LM head (generation tasks)."""
        return self.backbone.generate(input_ids, **kwargs)

    # -- files --------------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path) -> None:
        """The adapter exactly as PeftModel saves it, then the heads beside it."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(folder)
        heads = {f"heads.{name}": tensor for name, tensor in self.heads.state_dict().items()}
        safetensors_io.write(heads, folder / HEADS_WEIGHTS)
        config = {"format": HEADS_FORMAT, "tasks": {name: spec.to_dict() for name, spec in self.specs.items()}}
        (folder / HEADS_CONFIG).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    @classmethod
    def from_pretrained(cls, model: nn.Module, folder: str | Path, is_trainable: bool = False) -> MultiTaskModel:
        """`model`: the base (as given to get_peft_model); the adapter and the heads come from `folder`."""
        folder = Path(folder)
        tasks = read_task_specs(folder)
        multi = cls(PeftModel.from_pretrained(model, folder, is_trainable=is_trainable), tasks)
        load_heads(multi, folder / HEADS_WEIGHTS)
        multi.heads.requires_grad_(is_trainable)
        return multi if is_trainable else multi.eval()


def read_task_specs(folder: Path) -> dict[str, TaskSpec]:
    path = folder / HEADS_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"no {HEADS_CONFIG} in {folder}: not a folder saved by MultiTaskModel.save_pretrained")
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("format") != HEADS_FORMAT:
        raise ValueError(f"{path}: format {config.get('format')!r}, this peftcore reads format {HEADS_FORMAT}")
    try:
        return {name: TaskSpec.from_dict(spec) for name, spec in config["tasks"].items()}
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None


@torch.no_grad()
def load_heads(model: MultiTaskModel, path: Path) -> None:
    """Every head tensor must be in the file with its shape; extra tensors are an error too."""
    params = {f"heads.{name}": p for name, p in model.heads.state_dict(keep_vars=True).items()}
    found = set()
    for name, tensor in safetensors_io.iter_tensors(path):
        if name not in params:
            raise ValueError(f"{path.name}: tensor {name} belongs to no head of this model "
                             f"(heads: {', '.join(model.heads)})")
        if params[name].shape != tensor.shape:
            raise ValueError(f"{path.name}: {name} has shape {tuple(tensor.shape)}, "
                             f"the head needs {tuple(params[name].shape)}")
        params[name].copy_(tensor)
        found.add(name)
    missing = sorted(set(params) - found)
    if missing:
        raise ValueError(f"{path.name}: missing {', '.join(missing)}")
