"""Data-parallel training throughput: 1 process vs 2 (DDP and FSDP2), through the real `train()` loop.

    python bench/bench_distributed.py                       # CPU: gloo, 2 processes x 1 thread
    python bench/bench_distributed.py --steps 8 --repeats 1 # quicker
    python bench/bench_distributed.py --device cuda         # 1 GPU vs 2 GPUs (needs 2 visible GPUs)

Each configuration runs in fresh processes (the multi-process ones under torchrun) and trains the
same LoRA job: a Llama-shaped model (random weights), fixed-length rows so every step has the same
token count, the same global batch everywhere (2 x --batch rows per optimizer step). Throughput is
the median of metrics.jsonl's tokens_per_s (global tokens / rank 0's step time) after --warmup steps;
the table shows the median over alternating rounds, and ratios are taken within a round, then the
median of those (a shared machine's load drifts between rounds; within one it mostly does not).

CPU, 2 cores: the fair comparison for "2 processes" (1 thread each) is 1 process with 2 threads
(same cores, same global batch): that ratio says whether data parallelism beats intra-op threading.
1 process with 1 thread and the global batch is measured too, since on a busy machine a second
intra-op thread can slow a process down; the ratio is taken against the faster of the two.
The classic scaling efficiency, tok/s(2 procs) / (2 x tok/s(1 proc, 1 thread, batch --batch)), says
how much of a second worker's compute survives the communication.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(args) -> None:
    """One training run (this process is one rank); rank 0 writes the median tokens/s to args.result."""
    import torch

    torch.set_num_threads(args.threads)
    from peftcore import LoraConfig, get_peft_model
    from peftcore.data.records import TokenizedExample
    from peftcore.models import LlamaConfig, from_config
    from peftcore.training import distributed
    from peftcore.training.config import TrainConfig
    from peftcore.training.loop import train

    distributed.setup()
    device = torch.device("cuda") if args.device == "cuda" else torch.device("cpu")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                         num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64))
    model = from_config(config).to(device=device, dtype=torch.bfloat16 if args.device == "cuda" else torch.float32)
    peft = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    g = torch.Generator().manual_seed(1)
    rows = [TokenizedExample(f"r{i}", ids, ids) for i in range(64)
            for ids in [torch.randint(3, args.vocab, (args.seq,), generator=g).tolist()]]
    steps = args.warmup + args.steps
    cfg = TrainConfig(max_steps=steps, learning_rate=1e-4, batch_size=args.batch, eval_every=0, progress=False,
                      lr_schedule="constant", strategy=args.strategy)
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        train(peft, rows, [], cfg, out)
        seconds = time.perf_counter() - started
        if distributed.is_main():
            records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
            rates = [r["tokens_per_s"] for r in records[args.warmup:]]
            Path(args.result).write_text(json.dumps({"tokens_per_s": statistics.median(rates), "run_seconds": seconds}))
    distributed.teardown()


def run(label: str, nproc: int, threads: int, batch: int, strategy: str, args) -> dict:
    result = Path(tempfile.mkstemp(suffix=".json")[1])
    worker_args = [str(Path(__file__).resolve()), "--worker", "--result", str(result), "--threads", str(threads),
                   "--batch", str(batch), "--strategy", strategy, "--device", args.device, "--hidden", str(args.hidden),
                   "--layers", str(args.layers), "--vocab", str(args.vocab), "--seq", str(args.seq),
                   "--steps", str(args.steps), "--warmup", str(args.warmup)]
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc-per-node={nproc}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    done = subprocess.run(launcher + worker_args, env=env, capture_output=True, text=True, timeout=1200)
    if done.returncode != 0:
        raise RuntimeError(f"{label} failed:\n{done.stderr[-4000:]}")
    measured = json.loads(result.read_text())
    result.unlink()
    return {"label": label, "processes": nproc, "threads": threads, "batch_per_process": batch, "strategy": strategy,
            **measured}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4000)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4, help="rows per process per step (1 process, 2 threads: 2x)")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds; medians over rounds are reported")
    parser.add_argument("--json", default="bench/results/distributed.json")
    # worker-only
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--strategy", default="auto", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def make_plan(device: str, b: int) -> list[tuple[str, int, int, int, str]]:
    """(label, processes, threads per process, rows per process, strategy) of every configuration."""
    if device == "cpu":
        return [("1 proc x 1 thread, batch b", 1, 1, b, "auto"),
                ("1 proc x 2 threads, batch 2b", 1, 2, 2 * b, "auto"),
                ("1 proc x 1 thread, batch 2b", 1, 1, 2 * b, "auto"),
                ("2 procs x 1 thread, ddp", 2, 1, b, "ddp"),
                ("2 procs x 1 thread, fsdp", 2, 1, b, "fsdp")]
    import torch

    if torch.cuda.device_count() < 2:
        raise SystemExit(f"--device cuda compares 1 and 2 GPUs; {torch.cuda.device_count()} visible")
    return [("1 GPU, batch b", 1, 1, b, "auto"), ("1 GPU, batch 2b", 1, 1, 2 * b, "auto"),
            ("2 GPUs, ddp", 2, 1, b, "ddp"), ("2 GPUs, fsdp", 2, 1, b, "fsdp")]


def measure_rounds(plan, args) -> list[dict[str, dict]]:
    """Alternating rounds: a ratio is taken within one round, minutes apart at most."""
    rounds = []
    for _ in range(args.repeats):
        measured = {}
        for label, nproc, threads, batch, strategy in plan:
            measured[label] = run(label, nproc, threads, batch, strategy, args)
            print(f"{label:34s} {measured[label]['tokens_per_s']:10.0f} tok/s", flush=True)
        rounds.append(measured)
    return rounds


def summarize_rounds(plan, rounds: list[dict[str, dict]], b: int) -> list[dict]:
    """Median tokens/s per configuration; for 2 processes, per round: vs 2 x (1 process, 1 thread,
    batch b), and vs the faster 1-process run of the global batch."""
    single_b = plan[0][0]
    global_batch = [label for label, nproc, _, batch, _ in plan if nproc == 1 and batch == 2 * b]
    median = statistics.median
    results = []
    for label, *_ in plan:
        r = {**rounds[0][label], "tokens_per_s": median(m[label]["tokens_per_s"] for m in rounds),
             "tokens_per_s_rounds": [m[label]["tokens_per_s"] for m in rounds]}
        r.pop("run_seconds", None)
        if rounds[0][label]["processes"] > 1:
            r["scaling_efficiency"] = median(
                m[label]["tokens_per_s"] / (2 * m[single_b]["tokens_per_s"]) for m in rounds)
            r["vs_one_process_global_batch"] = median(
                m[label]["tokens_per_s"] / max(m[g]["tokens_per_s"] for g in global_batch) for m in rounds)
        results.append(r)
    return results


def print_table(results: list[dict]) -> None:
    print("\n| configuration | tok/s (median of rounds) | scaling efficiency | vs faster 1 process, global batch |")
    print("|---|---|---|---|")
    for r in results:
        eff = f"{r['scaling_efficiency']:.2f}" if "scaling_efficiency" in r else "-"
        rel = f"{r['vs_one_process_global_batch']:.2f}x" if "vs_one_process_global_batch" in r else "-"
        print(f"| {r['label']} | {r['tokens_per_s']:.0f} | {eff} | {rel} |")


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return {}
    plan = make_plan(args.device, args.batch)
    load_before = os.getloadavg()
    results = summarize_rounds(plan, measure_rounds(plan, args), args.batch)
    report = {"device": args.device, "model": {k: getattr(args, k) for k in ("hidden", "layers", "vocab", "seq")},
              "batch": args.batch, "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
              "load_average_before_after": [load_before[0], os.getloadavg()[0]], "results": results}
    print(f"load average (1 min) before / after: {load_before[0]:.1f} / {os.getloadavg()[0]:.1f}")
    print_table(results)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
