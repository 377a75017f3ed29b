"""`peftcore generate`, and the decoding every job shares: batched, left-padded generation of prompts'
continuations with an adapter, in the settings of the adapter's recipe ([eval])."""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import fields, replace
from pathlib import Path

import torch

from peftcore._logging import quiet
from peftcore.analysis.text_metrics import mostly_cjk
from peftcore.data.records import PromptTemplate, chat_prompt, special_tokens_around
from peftcore.jobs.adapter_folder import Loaded, load_adapter_folder, load_base_alone
from peftcore.jobs.bases import TaskError
from peftcore.jobs.recipe import EvalSection
from peftcore.jobs.tasks import Record, pad_id
from peftcore.models.generate import SamplingConfig, generate
from peftcore.peft_model import PeftModel

log = logging.getLogger(__name__)

def eval_settings(loaded: Loaded, **overrides) -> EvalSection:
    """The adapter's recipe [eval] section (an adapter from elsewhere: the defaults), then the
    overrides that are set."""
    known = {f.name for f in fields(EvalSection)}
    recorded = EvalSection(**{k: v for k, v in loaded.info.get("eval", {}).items() if k in known})
    return replace(recorded, **{k: v for k, v in overrides.items() if v is not None})


def run_generate(adapter: Path | None, prompt: str, base: str | None = None, raw: bool = False,
                 instruction: str | None = None, chat: bool = False, sampling: dict | None = None,
                 seed: int = 0) -> str:
    """`sampling`: SamplingConfig fields to override the adapter's recorded [eval] ones with (None: keep).
    No adapter: the base alone (`base` required), the prompt in its chat template if it has one, else raw."""
    if adapter is None and not base:
        raise TaskError("generate needs --adapter DIR, or --base (a folder, .gguf file, pip:<package>) "
                        "for the base alone")
    with quiet():  # stdout carries the generated text alone
        loaded = load_adapter_folder(adapter, base) if adapter is not None else load_base_alone(base)
    raw = raw or (adapter is None and not loaded.template.chat_template)
    if loaded.labels is not None:
        raise TaskError(f"{adapter} is a classification adapter ({', '.join(loaded.labels)}): use peftcore predict")
    if instruction is None:  # as training asked: peftcore_recipe.json records its instructions
        instruction = instruction_for(loaded.info, prompt)
    text = prompt if raw else render_prompt(loaded.template, prompt, instruction, chat)
    settings = eval_settings(loaded, **(sampling or {}), batch_size=1)
    return generate_texts(loaded.peft_model, loaded.tokenizer, [text], settings, loaded.device, seed=seed or 0)[0]


def trained_instructions(records: list[Record]) -> dict[str, str]:
    """The instruction most training records of each script carried ({"cjk": ..., "other": ...}): what
    generate puts before a prompt that names none, so a question is asked as training asked it (the
    support data: an English instruction on English records, a Japanese one on Japanese records)."""
    by_script: dict[str, Counter] = {}
    for record in records:
        if record.instruction:
            script = "cjk" if mostly_cjk([record.shown]) else "other"
            by_script.setdefault(script, Counter())[record.instruction] += 1
    return {script: counts.most_common(1)[0][0] for script, counts in by_script.items()}


def instruction_for(info: dict, prompt: str) -> str | None:
    """The trained instruction for a prompt in this script (an adapter from elsewhere records none)."""
    instructions = info.get("instructions") or {}
    return instructions.get("cjk" if mostly_cjk([prompt]) else "other")


def render_prompt(template: PromptTemplate, prompt: str, instruction: str | None, chat: bool) -> str:
    """The prompt in the format the adapter trained on: the input template, or one user turn (after a
    system turn holding `instruction`, if given) in the chat template: for --chat, and for input/output
    adapters trained on a base with a chat template (PromptTemplate.io_as_chat)."""
    if not chat and not (template.chat_template and template.io_as_chat):
        return template.render({"input": prompt, "instruction": instruction or ""})
    system = [{"role": "system", "content": instruction}] if instruction else []
    return chat_prompt([*system, {"role": "user", "content": prompt}], template)


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """As the training rows begin: the tokenizer's leading special tokens (if it adds any), then the prompt's."""
    lead, _ = special_tokens_around(tokenizer)
    return lead + tokenizer.encode(prompt, add_special_tokens=False)


@torch.no_grad()
def generate_texts(model, tokenizer, prompts: list[str], settings, device=None, seed: int = 0,
                   progress: str | None = None) -> list[str]:
    """Batched decoding (left-padded) of the continuation of each prompt; `settings`: the SamplingConfig
    fields it holds (a recipe's [eval] section) and batch_size. `progress`: a bar's label (stderr), for
    the minute a whole eval set takes on a CPU."""
    from tqdm.auto import tqdm

    model.eval()
    pad = pad_id(tokenizer)
    sampling = SamplingConfig.of(settings, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad)
    generator = torch.Generator(device=device or "cpu").manual_seed(seed) if sampling.temperature else None
    outputs = []
    starts = range(0, len(prompts), max(1, settings.batch_size))
    for start in tqdm(starts, desc=progress, unit="batch", disable=progress is None, dynamic_ncols=True):
        encoded = [prompt_ids(tokenizer, p) for p in prompts[start : start + settings.batch_size]]
        width = max(len(ids) for ids in encoded)
        ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=device)
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=device)
        tokens = decode(model, ids, attention_mask=mask, sampling=sampling, generator=generator)
        outputs += [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in tokens]
    return outputs


def decode(model, ids, **kwargs) -> torch.Tensor:
    """An adapted model's generate (prompt methods add their virtual tokens), or a bare base's."""
    return model.generate(ids, **kwargs) if isinstance(model, PeftModel) else generate(model, ids, **kwargs)


def show_samples(loaded: Loaded, records: list[Record], settings) -> list[dict]:
    """The base's answer (adapter disabled) beside the adapted one, for the first eval records: what the
    training changed, in the model's own words."""
    prompts = [r.prompt for r in records]
    with loaded.peft_model.disable_adapter():
        before = generate_texts(loaded.peft_model, loaded.tokenizer, prompts, settings, loaded.device)
    generated = generate_texts(loaded.peft_model, loaded.tokenizer, prompts, settings, loaded.device)
    mode = "greedy" if not settings.temperature else f"temperature {settings.temperature}"
    log.info(f"samples ({mode}, up to {settings.max_new_tokens} new tokens; base = the adapter disabled):")
    out = []
    for i, (record, base, text) in enumerate(zip(records, before, generated), start=1):
        log.info(f"[{i}] prompt:    {one_line(record.shown)}\n    reference: {one_line(record.reference)}\n"
                 f"    base:      {one_line(base)}\n    generated: {one_line(text)}")
        out.append({"where": record.where, "prompt": record.shown, "reference": record.reference, "base": base,
                    "generated": text})
    return out


def one_line(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
