"""Llama forward throughput and peak memory: peftcore's model against transformers' on one checkpoint.

What a user would pick instead of `peftcore.models.load_pretrained` is
`transformers.AutoModelForCausalLM.from_pretrained`. Both load the SAME saved folder (a random
~58M-parameter Llama: hidden 512, 8 layers, 8 heads, intermediate 1376, vocab 32000) and compute
logits for the same batch (default 4 x 256 tokens, fp32, CPU, no padding) under inference_mode.
transformers runs with `use_cache=False`, so it builds no KV cache we do not build either.

Throughput: both models in one process; warmup forwards, then `--repeats` rounds, each running
both models once in alternating order, so load from other processes hits both alike. Reported:
tokens/s from the median wall time per forward, and the speedup as the median of the per-round
ratios (paired), from wall time and from the process' CPU time (steadier on a busy machine).

Peak memory: one fresh subprocess per model (VmRSS / VmHWM from /proc: ru_maxrss would carry over
the parent's peak through fork + exec). "load" = high-water mark after loading minus the resident
size after imports; "forward" = high-water mark during one forward minus the resident size after
loading (activations + logits); "peak" = the whole high-water mark minus the size after imports.

    python bench/bench_forward.py                       # 4 x 256, 5 rounds, torch's default threads
    python bench/bench_forward.py --repeats 15 --batch 1 --seq 1024

Prints a markdown table and writes bench/results/forward.json. Absolute CPU times on a shared
machine are noise; the side-by-side ratios are the result.
"""
from __future__ import annotations

import argparse
import json
import platform
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
RESULTS = Path(__file__).resolve().parent / "results" / "forward.json"


def save_checkpoint(folder: Path) -> None:
    import transformers

    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).save_pretrained(folder)


def load(which: str, folder: Path):
    if which == "ours":
        from peftcore.models import load_pretrained

        return load_pretrained(folder)
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(folder).eval()


def forward(which: str, model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids) if which == "ours" else model(ids, use_cache=False).logits


def timed(which: str, model, ids: torch.Tensor) -> tuple[float, float]:
    """-> (wall seconds, CPU seconds of this process). CPU time is the steadier figure when other
    processes share the cores: it does not count the time this process waits for a core."""
    wall, cpu = time.perf_counter(), time.process_time()
    forward(which, model, ids)
    return time.perf_counter() - wall, time.process_time() - cpu


@torch.inference_mode()
def throughput(folder: Path, batch: int, seq: int, warmup: int, repeats: int) -> dict:
    models = {which: load(which, folder) for which in ("ours", "hf")}
    ids = torch.randint(0, CONFIG["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(0))
    diff = (forward("ours", models["ours"], ids) - forward("hf", models["hf"], ids)).abs().max().item()
    for _ in range(warmup):
        for which, model in models.items():
            forward(which, model, ids)
    wall, cpu = {"ours": [], "hf": []}, {"ours": [], "hf": []}
    for round_ in range(repeats):
        order = ("ours", "hf") if round_ % 2 == 0 else ("hf", "ours")
        for which in order:
            w, c = timed(which, models[which], ids)
            wall[which].append(w)
            cpu[which].append(c)
    tokens = batch * seq
    return {
        "max_abs_logit_diff": diff,
        "wall_s": wall,
        "cpu_s": cpu,
        "median_wall_s": {k: statistics.median(v) for k, v in wall.items()},
        "tokens_per_s": {k: tokens / statistics.median(v) for k, v in wall.items()},
        "speedup_wall_paired": statistics.median(h / o for o, h in zip(wall["ours"], wall["hf"])),
        "speedup_cpu_paired": statistics.median(h / o for o, h in zip(cpu["ours"], cpu["hf"])),
    }


def memory_child(which: str, folder: Path, batch: int, seq: int) -> None:
    """Run in a fresh process: print this model's memory figures as JSON."""
    import transformers  # noqa: F401  imported for both, so the baseline holds the same libraries

    import peftcore.models  # noqa: F401

    ids = torch.randint(0, CONFIG["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(0))
    after_imports = status_bytes("VmRSS")
    model = load(which, folder)
    after_load, load_hwm = status_bytes("VmRSS"), status_bytes("VmHWM")
    with torch.inference_mode():
        forward(which, model, ids)
    hwm = status_bytes("VmHWM")
    print(json.dumps({"load": load_hwm - after_imports, "forward": hwm - after_load, "peak": hwm - after_imports}))


def memory(folder: Path, batch: int, seq: int) -> dict:
    result = {}
    for which in ("ours", "hf"):
        cmd = [sys.executable, __file__, "--memory-child", which, "--checkpoint", str(folder),
               "--batch", str(batch), "--seq", str(seq), "--threads", str(torch.get_num_threads())]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        result[which] = json.loads(out.strip().splitlines()[-1])
    return result


def markdown(res: dict) -> str:
    t, m, mib = res["throughput"], res["memory"], 2**20
    header = ("| shape | ours tok/s | transformers tok/s | speedup wall / CPU time (paired medians) "
              "| peak MiB ours / hf | forward MiB ours / hf | load MiB ours / hf |\n|---|---|---|---|---|---|---|")
    row = (f"| {res['batch']}x{res['seq']} fp32, {res['threads']} thread(s) "
           f"| {t['tokens_per_s']['ours']:.0f} | {t['tokens_per_s']['hf']:.0f} "
           f"| {t['speedup_wall_paired']:.3f}x / {t['speedup_cpu_paired']:.3f}x "
           f"| {m['ours']['peak'] / mib:.0f} / {m['hf']['peak'] / mib:.0f} "
           f"| {m['ours']['forward'] / mib:.0f} / {m['hf']['forward'] / mib:.0f} "
           f"| {m['ours']['load'] / mib:.0f} / {m['hf']['load'] / mib:.0f} |")
    return header + "\n" + row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--checkpoint", type=Path, help="reuse a folder saved by an earlier run")
    parser.add_argument("--memory-child", choices=("ours", "hf"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        return memory_child(args.memory_child, args.checkpoint, args.batch, args.seq)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.checkpoint or Path(tmp)
        if not (folder / "config.json").is_file():
            save_checkpoint(folder)
        res = {
            "batch": args.batch, "seq": args.seq, "dtype": "float32", "threads": torch.get_num_threads(),
            "config": CONFIG, "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
            "memory": memory(folder, args.batch, args.seq),
            "throughput": throughput(folder, args.batch, args.seq, args.warmup, args.repeats),
        }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(res, indent=2) + "\n")
    print(markdown(res))
    print(f"max |logits ours - transformers| = {res['throughput']['max_abs_logit_diff']:.2e}; wrote {RESULTS}")


if __name__ == "__main__":
    main()
