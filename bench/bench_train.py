"""LoRA training step: tokens/s and peak memory, peftcore against transformers + HF PEFT.

What a user would pick instead of peftcore is transformers' `LlamaForCausalLM` wrapped by HF
PEFT's `get_peft_model`. Both load the SAME saved folder (a random Llama: hidden 512, 8 layers,
8 heads, intermediate 1376, vocab 32000: 25.2M parameters in the decoder blocks, 58.0M with
embedding and head) and train LoRA r=16, alpha 32, dropout 0 on every linear layer but lm_head
(target_modules="all-linear") on the same batch (default 4 x 256 tokens, all trained, fp32, CPU).
One step = zero_grad, forward, cross-entropy over all next-token targets, backward,
clip_grad_norm_(1.0), AdamW.step(). Contenders:

    ours        peftcore model + LoRA; loss from `model(ids, attention_mask=, labels=)` (the fused
                chunked cross-entropy: no (B*T, vocab) logits), divided by the target count
    train_step  the same model through the library's loop step, `peftcore.training.loop.train_step`
                (its loss_sum takes the same fused path: the two rows should agree)
    hf          transformers + HF PEFT, `model(input_ids, attention_mask=, labels=).loss`

Throughput: all contenders in one process; a warmup step each, then `--repeats` rounds, each
running every contender once in rotating order, so load from other processes hits all alike.
Reported: tokens/s from the median wall time per step, and speedups vs hf as medians of the
per-round ratios (paired), from wall time and from the process' CPU time (user + system: page
faults count; steadier on a busy machine).

Peak memory: one fresh subprocess per contender (VmRSS / VmHWM from /proc). "train" = high-water
mark during two steps (the first allocates gradients and AdamW state) minus the resident size
after loading, wrapping and building the optimizer; "peak" = the high-water mark minus the size
after imports.

    python bench/bench_train.py                      # 4 x 256, 5 rounds, 1 thread
    python bench/bench_train.py --threads 2 --repeats 9 --profile

One thread by default: on the shared 2-core machine this was written on (load average ~5), two
OpenMP threads spend most of a step spin-waiting for a preempted partner (13.7 s of CPU per step
instead of 2.4 s). Prints a markdown table and writes bench/results/train.json.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from proc_memory import status_bytes

CONFIG = dict(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
              num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=2048)
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
CONTENDERS = ("ours", "train_step", "hf")
RESULTS = Path(__file__).resolve().parent / "results" / "train.json"


def save_checkpoint(folder: Path) -> None:
    import transformers

    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).save_pretrained(folder)


def make_batch(batch: int, seq: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, CONFIG["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def build(which: str, folder: Path, batch: dict):
    """-> (model, step): step() runs one optimizer update and returns the loss (a float)."""
    torch.manual_seed(0)
    if which == "hf":
        import peft
        import transformers

        base = transformers.AutoModelForCausalLM.from_pretrained(folder)
        model = peft.get_peft_model(base, peft.LoraConfig(**LORA, task_type="CAUSAL_LM"))
    else:
        from peftcore import LoraConfig, get_peft_model
        from peftcore.models import load_pretrained

        model = get_peft_model(load_pretrained(folder), LoraConfig(**LORA, task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if which == "train_step":
        from peftcore.training.config import TrainConfig
        from peftcore.training.loop import build_optimizer, train_step

        config = TrainConfig(learning_rate=1e-4, weight_decay=0.0, max_grad_norm=1.0, progress=False)
        optimizer = build_optimizer(model, config)
        return model, lambda: train_step(model, [batch], optimizer, config)["loss"]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    n_targets = int((batch["labels"][:, 1:] != -100).sum())

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        if which == "hf":
            loss = model(**batch, use_cache=False).loss
        else:
            loss = model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]) / n_targets
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        return float(loss.detach())

    return model, step


def usage() -> tuple[float, int]:
    """(CPU seconds, user + system; minor page faults) of this process so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime, r.ru_minflt


def throughput(folder: Path, which: list[str], batch: dict, warmup: int, repeats: int) -> dict:
    steps = {w: build(w, folder, batch)[1] for w in which}
    first_loss = {w: step() for w, step in steps.items()}  # LoRA B starts at zero: the base model's loss
    for _ in range(warmup):
        for step in steps.values():
            step()
    wall, cpu, faults = ({w: [] for w in which} for _ in range(3))
    for round_ in range(repeats):
        order = which[round_ % len(which):] + which[:round_ % len(which)]
        for w in order:
            t, (c, f) = time.perf_counter(), usage()
            steps[w]()
            wall[w].append(time.perf_counter() - t)
            c2, f2 = usage()
            cpu[w].append(c2 - c)
            faults[w].append(f2 - f)
    tokens = int(batch["attention_mask"].sum())
    res = {
        "first_loss": first_loss, "wall_s": wall, "cpu_s": cpu, "page_faults": faults,
        "median_wall_s": {w: statistics.median(v) for w, v in wall.items()},
        "median_cpu_s": {w: statistics.median(v) for w, v in cpu.items()},
        "median_page_faults": {w: statistics.median(v) for w, v in faults.items()},
        "tokens_per_s": {w: tokens / statistics.median(v) for w, v in wall.items()},
    }
    if "hf" in which:
        res["speedup_wall_paired"] = {w: statistics.median(h / o for o, h in zip(wall[w], wall["hf"])) for w in which}
        res["speedup_cpu_paired"] = {w: statistics.median(h / o for o, h in zip(cpu[w], cpu["hf"])) for w in which}
    return res


def profile(folder: Path, which: list[str], batch: dict, min_ms: float = 15.0) -> str:
    """torch.profiler self time per op (GEMMs split by shape), one step each after a warmup step,
    as a markdown table. Self times are wall time per op: on a busy machine, compare columns."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    steps = {w: build(w, folder, batch)[1] for w in which}
    totals = {w: collections.Counter() for w in which}
    for w, step in steps.items():
        step()
        with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            step()
        for event in prof.key_averages(group_by_input_shape=True):
            key = f"{event.key} {event.input_shapes[:2]}" if event.key in ("aten::mm", "aten::addmm") else event.key
            totals[w][key] += event.self_cpu_time_total / 1e3
    keys = sorted({k for t in totals.values() for k, v in t.items() if v >= min_ms},
                  key=lambda k: -max(t[k] for t in totals.values()))
    lines = ["| op (self ms) | " + " | ".join(which) + " |", "|---|" + "---|" * len(which)]
    lines += [f"| {k} | " + " | ".join(f"{totals[w][k]:.0f}" for w in which) + " |" for k in keys]
    lines.append("| total (all ops) | " + " | ".join(f"{sum(totals[w].values()):.0f}" for w in which) + " |")
    return "\n".join(lines)


def memory_child(which: str, folder: Path, batch_size: int, seq: int) -> None:
    """Run in a fresh process: print this contender's memory figures as JSON."""
    import peft  # noqa: F401  imported for every contender, so the baseline holds the same libraries
    import transformers  # noqa: F401

    import peftcore.models  # noqa: F401
    import peftcore.training.loop  # noqa: F401

    batch = make_batch(batch_size, seq)
    after_imports = status_bytes("VmRSS")
    _, step = build(which, folder, batch)
    after_load, load_hwm = status_bytes("VmRSS"), status_bytes("VmHWM")
    step()
    step()
    hwm = status_bytes("VmHWM")
    print(json.dumps({"load": load_hwm - after_imports, "train": hwm - after_load, "peak": hwm - after_imports}))


def memory(folder: Path, which: list[str], batch: int, seq: int, threads: int) -> dict:
    result = {}
    for w in which:
        cmd = [sys.executable, __file__, "--memory-child", w, "--checkpoint", str(folder),
               "--batch", str(batch), "--seq", str(seq), "--threads", str(threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        result[w] = json.loads(out.strip().splitlines()[-1])
    return result


def cpu_name() -> str:
    try:
        line = next(line for line in open("/proc/cpuinfo") if line.startswith("model name"))
        return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def markdown(res: dict) -> str:
    t, m, mib = res["throughput"], res["memory"], 2**20
    rows = ["| contender | tok/s | median step wall / CPU s | speedup vs hf, wall / CPU (paired) "
            "| page faults / step | train MiB (HWM - after load) | vs hf | peak MiB (HWM - after imports) |",
            "|---|---|---|---|---|---|---|---|"]
    nan = float("nan")
    speedup_wall, speedup_cpu = t.get("speedup_wall_paired", {}), t.get("speedup_cpu_paired", {})
    for w in res["contenders"]:
        train, hf_train = m.get(w, {}).get("train", nan), m.get("hf", {}).get("train", nan)
        rows.append(
            f"| {w} | {t['tokens_per_s'][w]:.0f} | {t['median_wall_s'][w]:.2f} / {t['median_cpu_s'][w]:.2f} "
            f"| {speedup_wall.get(w, nan):.3f}x / {speedup_cpu.get(w, nan):.3f}x "
            f"| {t['median_page_faults'][w]:.0f} | {train / mib:.0f} | {train / hf_train:.2f}x "
            f"| {m.get(w, {}).get('peak', nan) / mib:.0f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, see the docstring)")
    parser.add_argument("--contenders", default=",".join(CONTENDERS),
                        help="comma-separated subset of " + ", ".join(CONTENDERS))
    parser.add_argument("--skip-memory", action="store_true", help="throughput only")
    parser.add_argument("--profile", action="store_true", help="also print a per-op profile table")
    parser.add_argument("--checkpoint", type=Path, help="reuse a folder saved by an earlier run")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--memory-child", choices=CONTENDERS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_child:
        return memory_child(args.memory_child, args.checkpoint, args.batch, args.seq)
    which = [w for w in args.contenders.split(",") if w]
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if unknown := set(which) - set(CONTENDERS):
        parser.error(f"unknown contenders {sorted(unknown)}; choose from {', '.join(CONTENDERS)}")
    batch = make_batch(args.batch, args.seq)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.checkpoint or Path(tmp)
        if not (folder / "config.json").is_file():
            save_checkpoint(folder)
        load_before = os.getloadavg()
        res = {
            "batch": args.batch, "seq": args.seq, "dtype": "float32", "threads": torch.get_num_threads(),
            "contenders": which, "config": CONFIG, "lora": LORA, "torch": torch.__version__, "cpu": cpu_name(),
            "date": time.strftime("%Y-%m-%d"),
            "memory": {} if args.skip_memory else memory(folder, which, args.batch, args.seq, args.threads),
            "throughput": throughput(folder, which, batch, args.warmup, args.repeats),
        }
        res["loadavg_before_after"] = [load_before, os.getloadavg()]
        if args.profile:
            res["profile"] = profile(folder, which, batch)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(markdown(res))
    losses = res["throughput"]["first_loss"]
    print("first-step loss (LoRA B = 0, so the base model's): " + ", ".join(f"{w} {v:.6f}" for w, v in losses.items()))
    print(f"load average (1/5/15 min) before {load_before}, after {res['loadavg_before_after'][1]}; "
          f"{res['threads']} thread(s); {res['cpu']}; torch {res['torch']}; wrote {args.out}")
    if args.profile:
        print(res["profile"])
    return res


if __name__ == "__main__":
    main()
