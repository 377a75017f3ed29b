"""`peftcore merge`: fold an adapter folder's adapter into its base, a plain checkpoint folder out."""
from __future__ import annotations

import logging
from pathlib import Path

from peftcore.adapter_io import read_adapter_config
from peftcore.jobs.adapter_folder import copy_tokenizer, load_adapter_folder
from peftcore.jobs.bases import TaskError
from peftcore.lora.quantized_merge import format_merge_report
from peftcore.models import save_pretrained
from peftcore.peft_model import PeftModel

log = logging.getLogger(__name__)

def run_merge(adapter: Path, output: Path, base: str | None = None, into: str | None = None) -> Path:
    """Fold the adapter into its base. A QLoRA adapter (trained over a quantized base) merges into the
    base's original weights by default, or with into="quantized" into the dequantized weights it was
    trained against (the merged model then computes exactly what training saw; the log reports what
    re-quantizing each merged layer would cost). A LoftQ adapter merges into the quantized weights only: its
    B A starts as W - dequant(Q), so on the original W that correction would count twice."""
    loftq = read_adapter_config(adapter).get("init_lora_weights") == "loftq"
    into = into or ("quantized" if loftq else "original")
    if loftq and into == "original":
        raise TaskError(f"--into original: {adapter} is a LoftQ adapter, initialised as the quantization error "
                        "W - dequant(Q) of its base; merged into the original W it would add that error twice. "
                        "Merge it --into quantized (the default for LoftQ adapters)")
    if into not in ("original", "quantized"):
        raise TaskError(f"--into {into!r}: choose original or quantized")
    loaded = load_adapter_folder(adapter, base, merge_ready=into == "original")
    if not isinstance(loaded.peft_model, PeftModel) or loaded.peft_model.is_prompt_learning:
        raise TaskError(f"{adapter} holds a prompt-learning adapter: it adds inputs, not weights, so there is "
                        "nothing to merge; load it with the base instead")
    quantized = (loaded.info.get("model") or {}).get("quantize")
    if into == "quantized" and not quantized:
        raise TaskError(f"--into quantized: {adapter} was not trained over a quantized base "
                        "(its recipe has no quantize)")
    merged = loaded.peft_model.merge_and_unload()
    if into == "quantized":
        log.info(format_merge_report(loaded.peft_model.merge_report))
    elif quantized:
        log.info(f"the adapter trained over the {quantized} rounding of the base; merged into the original weights "
            "(--into quantized: into the rounded ones it saw)")
    output = Path(output)
    save_pretrained(merged, output)
    has_own = (Path(adapter) / "tokenizer.json").is_file()  # the adapter folder carries its base's tokenizer
    copy_tokenizer(Path(adapter) if has_own else loaded.base_folder, loaded.tokenizer, output)
    log.info(f"merged {loaded.base_name} + {adapter} -> {output} (config.json, model.safetensors, tokenizer)")
    return output
