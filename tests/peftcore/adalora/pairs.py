"""What the AdaLoRA tests share: one tiny random Llama checkpoint, the same adapter built in HF PEFT (on
transformers' Llama) and in peftcore (on peftcore's Llama loaded from the same folder), and the two training loops.

PEFT's loop is its documented one: loss (PEFT's forward adds orth_reg_weight * regu_loss for a CAUSAL_LM model),
backward, optimizer.step(), base_model.update_and_allocate(step), zero_grad(). Ours runs one of three ways:
the training loop's train_step with hooks=, a hand-written loop with training.hooks' extra_loss / after_step, or
a hand-written loop with PEFT's own call (base_model.update_and_allocate).
"""
import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local: never reach for the Hub

import peft  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402

from peftcore import get_peft_model  # noqa: E402
from peftcore.adalora import AdaLoraConfig  # noqa: E402
from peftcore.models import load_pretrained  # noqa: E402
from peftcore.training import hooks as step_hooks  # noqa: E402
from peftcore.training.config import TrainConfig  # noqa: E402
from peftcore.training.loop import build_optimizer, train_step  # noqa: E402
from tests.peftcore.lora.test_vs_peft import LLAMA, VOCAB, perturb  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]  # 2 layers x 3 = 6 AdaLoRA layers: init budget 24, target 12
# warm-up to step 2, masks at steps 4, 6, 8, 10 (deltaT 2), the final mask at 11 (= 15 - 4), re-applied 12..14
SCHEDULE = dict(init_r=4, target_r=2, tinit=2, tfinal=4, deltaT=2, total_step=15)
ADAPTER_WORDS = ("lora_A", "lora_B", "lora_E")
LEARNING_RATE = 2e-2  # AdamW moves each entry ~lr per step: E leaves 0 at once and scores differ


def save_llama(folder) -> None:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA))
    perturb(model.parameters())
    model.save_pretrained(folder)


def adalora_kwargs(**overrides) -> dict:
    return {**dict(target_modules=TARGETS, lora_alpha=4, task_type="CAUSAL_LM", **SCHEDULE), **overrides}


def pair(folder, **overrides):
    """(PEFT's model, ours) with the same adapter: the same RNG state before each get_peft_model."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(1)
        hf = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(folder),
                                 peft.AdaLoraConfig(**adalora_kwargs(**overrides)))
        torch.manual_seed(1)
        ours = get_peft_model(load_pretrained(folder), AdaLoraConfig(**adalora_kwargs(**overrides)))
    return hf, ours


def ids() -> torch.Tensor:
    return torch.tensor([[3, 7, 9, 50, 11, 2], [4, 3, 3, 60, 7, 1]])


def logits(model) -> torch.Tensor:
    out = model(input_ids=ids())
    return getattr(out, "logits", out)


def batch() -> dict:
    """A causal LM batch: 4 rows of 8 tokens, the first 3 of each unlabelled (a prompt)."""
    input_ids = torch.randint(3, VOCAB, (4, 8), generator=torch.Generator().manual_seed(3))
    labels = input_ids.clone()
    labels[:, :3] = -100
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def strip(pattern: dict | None) -> dict | None:
    """PEFT's in-memory keys name the adapter (`...lora_E.default`); its files, and ours, do not."""
    return None if pattern is None else {k.removesuffix(".default"): v for k, v in pattern.items()}


def peft_step(hf, optimizer, step: int) -> float:
    b = batch()
    loss = hf(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
    loss.backward()
    optimizer.step()
    hf.base_model.update_and_allocate(step)
    optimizer.zero_grad()
    return float(loss.detach())


def ours_step(model, optimizer, config: TrainConfig, step: int, variant: str) -> dict:
    """One step of ours; -> what the hooks reported (after_step's record; {} for update_and_allocate)."""
    hooks = model.step_hooks()
    if variant == "train_step":
        train_step(model, [batch()], optimizer, config, hooks=hooks)
        return step_hooks.after_step(hooks, step)
    b = batch()
    out = model(b["input_ids"], attention_mask=b["attention_mask"])  # (B, T, V): token t predicts t + 1
    loss = F.cross_entropy(out[:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten(), ignore_index=-100)
    (loss + step_hooks.extra_loss(hooks)).backward()
    optimizer.step()
    if variant == "update_and_allocate":
        model.base_model.update_and_allocate(step)
        record = {}
    else:
        record = step_hooks.after_step(hooks, step)
    optimizer.zero_grad()
    return record


def train_config(steps: int = SCHEDULE["total_step"]) -> TrainConfig:
    return TrainConfig(learning_rate=LEARNING_RATE, max_steps=steps, lr_schedule="constant", progress=False,
                       eval_every=0, plots=False)


def train_pair(hf, ours, variant: str = "train_step", steps: int = SCHEDULE["total_step"]) -> list[dict]:
    """Train both for `steps`; -> per step: the largest parameter difference, both rank patterns, our record."""
    config = train_config(steps)
    opt_hf, opt_ours = build_optimizer(hf, config), build_optimizer(ours, config)
    hf.train(), ours.train()
    theirs = {n: p for n, p in hf.named_parameters() if p.requires_grad}
    mine = dict(ours.named_parameters())
    history = []
    for step in range(steps):
        peft_step(hf, opt_hf, step)
        record = ours_step(ours, opt_ours, config, step, variant)
        history.append({"diff": max(float((mine[n] - p).abs().max()) for n, p in theirs.items()),
                        "peft": strip(hf.peft_config["default"].rank_pattern),
                        "ours": ours.peft_config["default"].rank_pattern, "record": record})
    hf.eval(), ours.eval()
    return history
