"""GGUF dequant-matmul forward y = x W^T: the Q4_0 / Q4_1 / Q8_0 kernels vs dense, dequantize-then-matmul, NF4.

Section g (not yet in bench_kernels.py). Contenders, on one (N, K) weight W and input x (M, K), no grad:
  ours_q4_0, ours_q4_1, ours_q8_0   gguf_matmul_kernels.forward on BlockWeights of W (the Triton kernel
                                    on CUDA, or CPU under TRITON_INTERPRET=1; elsewhere the same math in
                                    torch: dequantize + F.linear)
  ref_q4_0, ref_q4_1, ref_q8_0      gguf_blocks.dequantize in x's dtype + F.linear (what a caller
                                    without the kernels does every call)
  dense                             F.linear on W in the same dtype (cuBLAS / MKL)
  ours_nf4                          peftcore quant_matmul on the NF4 quantization of W (the other 4-bit
                                    kernel: Q4_1 moves 5 bits a weight, NF4 4.5)
Ours are checked against the reference of their type. The BlockWeights come from a torch quantizer
here (llama.cpp's formulas, ties rounded as torch.round): the kernels' speed does not depend on the
values, and each check compares two paths on the same blocks. Goals (CUDA, K=N=8192): at M <= 16
(memory-bound GEMV) >= 75% of HBM bandwidth for each type; at M = 8192 >= 0.9x dense.
Timing and derived figures: kernel_harness.py.

    python bench/bench_gguf_matmul.py --device cpu --quick             # CPU, seconds (torch path)
    python bench/bench_gguf_matmul.py --shapes "kn=8192;m=1,16,8192"   # CUDA: the goal shapes
    python bench/bench_gguf_matmul.py --dry-run --gpu H200             # grid, FLOPs, bytes, no timing

Prints a markdown table and writes JSON (default bench/results/gguf_matmul.json).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from kernel_cli import format_cell, format_goals, format_ratio, format_us
from kernel_cli import main as run_main
from kernel_harness import Case, Contender, Run, Section, element_size, randn, triton_path, weight_bytes

TYPES = {"q4_0": 2, "q4_1": 3, "q8_0": 8}  # name -> ggml type
TYPE_BYTES = {"q4_0": 18 / 32, "q4_1": 20 / 32, "q8_0": 34 / 32}  # stored bytes a weight (block bytes / 32)
# (label, numerator, denominator) time ratios: each type vs dense and vs its dequantize-then-matmul; Q4_1 vs NF4
RATIOS = ([(f"dense/ours_{t}", "dense", f"ours_{t}") for t in TYPES] + [(f"ref/ours_{t}", f"ref_{t}", f"ours_{t}")
                                                                       for t in TYPES]
          + [("nf4/ours_q4_1", "ours_nf4", "ours_q4_1")])


def contender_costs(p: dict, e: int) -> dict:
    """(FLOPs, bytes) of the forward: weight as stored + x + y."""
    M, K, N = p["M"], p["K"], p["N"]
    flops, act = 2.0 * M * K * N, e * (M * K + M * N)
    costs = {f"ours_{t}": (flops, N * K * b + act) for t, b in TYPE_BYTES.items()}
    return costs | {"dense": (flops, weight_bytes("dense", N, K, e) + act),
                    "ours_nf4": (flops, weight_bytes("nf4", N, K, e) + act)}


def list_goals(K: int, N: int, M: int) -> list[dict]:
    """The goals at a shape (CUDA runs), as evaluate_goal reads them."""
    goals = []
    if K == N == 8192:
        for t in TYPES:
            if M <= 16:
                goals.append(dict(text=f"{t} M<=16: >= 75% of HBM", metric=("pct_hbm", f"ours_{t}"), op=">=",
                                  target=75.0))
            if M == 8192:
                goals.append(dict(text=f"{t} M=8192: >= 0.9x dense", metric=("ratio", f"dense/ours_{t}"), op=">=",
                                  target=0.9))
    return goals


def block_quantize(W: torch.Tensor, name: str):
    """W (N, K) -> a BlockWeight of type `name`, by llama.cpp's formulas (Q8_0: d = amax / 127; Q4_0:
    d = the signed absmax / -8, codes + 8; Q4_1: d = (max - min) / 15, m = min), on W's device."""
    from peftcore.kernels.gguf_blocks import BlockWeight

    N, K = W.shape
    blocks = W.float().reshape(N, K // 32, 32)

    def over(v, d):  # v / d per block; an all-zero block (d = 0) gets code 0 (Q4_x: + 8 / - min below)
        return v * torch.where(d == 0, 0.0, 1 / d)[..., None]

    if name == "q8_0":
        d = blocks.abs().amax(-1) / 127
        q = torch.round(over(blocks, d)).clamp(-127, 127).to(torch.int8)
        return BlockWeight(q.reshape(N, K), d.half(), None, TYPES[name], (N, K))
    if name == "q4_0":
        signed_max = blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True))[..., 0]
        d, m = signed_max / -8, None
        q = torch.round(over(blocks, d) + 8).clamp(0, 15)
    else:
        lo = blocks.amin(-1)
        d, m = (blocks.amax(-1) - lo) / 15, lo.half()
        q = torch.round(over(blocks - lo[..., None], d)).clamp(0, 15)
    q = q.to(torch.uint8)
    qs = (q[..., :16] | (q[..., 16:] << 4)).reshape(N, K // 2)  # weight j < 16: low nibble of byte j
    return BlockWeight(qs.contiguous(), d.half(), m, TYPES[name], (N, K))


def call_without_grad(f, *a, **kw):
    def fn():
        with torch.no_grad():
            return f(*a, **kw)
    return fn


def gguf_forward(x: torch.Tensor, w):
    """ours: the kernel where Triton runs for x, else the torch math (no triton installed, or plain CPU)."""
    from peftcore.kernels import dispatch
    from peftcore.kernels.gguf_blocks import dequantize

    if dispatch.HAS_TRITON and triton_path(x):
        from peftcore.kernels import gguf_matmul_kernels

        if gguf_matmul_kernels.supports(w):
            return gguf_matmul_kernels.forward(x, w, None, None, None, 0.0)
    return F.linear(x, dequantize(w, x.dtype))


def build_case(p: dict, run: Run) -> Case:
    from peftcore.kernels import quant
    from peftcore.kernels.gguf_blocks import dequantize
    from peftcore.kernels.quant_matmul import quant_matmul

    K, N, M, dtype, gen = p["K"], p["N"], p["M"], run.dtype, run.gen
    costs = contender_costs(p, element_size(dtype))
    W = randn((N, K), gen, dtype, 0.02)
    x = randn((M, K), gen, dtype)
    call = call_without_grad
    path = "Triton kernel" if triton_path(x) else "torch path"
    cs = []
    for t in TYPES:
        w = block_quantize(W, t)
        cs += [Contender(f"ours_{t}", call(gguf_forward, x, w), *costs[f"ours_{t}"], note=f"gguf kernel: {path}",
                         check=f"ref_{t}"),
               Contender(f"ref_{t}", call(lambda w=w: F.linear(x, dequantize(w, dtype))), *costs[f"ours_{t}"],
                         note="gguf_blocks.dequantize + F.linear", check=None)]
    cs += [Contender("dense", call(F.linear, x, W), *costs["dense"], note="torch F.linear (cuBLAS / MKL)", check=None),
           Contender("ours_nf4", call(quant_matmul, x, quant.nf4_quantize(W)), *costs["ours_nf4"],
                     note=f"quant_matmul NF4: {path}", check=None)]
    goals = list_goals(K, N, M) if run.device.type == "cuda" else []
    return Case("g", dict(K=K, N=N, M=M), cs, ratios=RATIOS, goals=goals)


def describe_dry_goal(row: dict) -> str:
    """The goals at a shape, as times where the roofline fixes them (75% HBM: roofline time / 0.75)."""
    goals = list_goals(row["K"], row["N"], row["M"])
    if not goals:
        return "—"
    if goals[0]["metric"][0] == "ratio":
        return f"each type {goals[0]['op']} {goals[0]['target']:.1f}x dense"
    c = row["contenders"]
    if all("roofline_ms" in c[f"ours_{t}"] for t in TYPES):
        times = " / ".join(f"{c[f'ours_{t}']['roofline_ms'] * 1e3 / 0.75:.1f}" for t in TYPES)
        return f"<= {times} us (75% HBM)"
    return "each type >= 75% HBM"


def format_table(rows: list[dict], dry: bool) -> list[str]:
    parts = ["### g. GGUF forward y = x W^T (times in us; ratios = other time / ours: > 1 means ours is faster)\n"]
    names = [f"ours_{t}" for t in TYPES]
    if dry:
        parts.append("| K=N | M | GFLOP | MB q4_0 / q4_1 / q8_0 / dense | roofline us q4_0 | q4_1 | q8_0 | dense "
                     "| goals for ours (CUDA run) | measured |\n|" + "---|" * 10)
        for r in rows:
            c = r["contenders"]
            mb = " / ".join(f"{c[n]['bytes'] / 1e6:.1f}" for n in [*names, "dense"])
            goals = describe_dry_goal(r)
            parts.append(f"| {r['K']} | {r['M']} | {c['dense']['flops'] / 1e9:.2f} | {mb} | "
                         + " | ".join(format_us(r, n, dry) for n in [*names, "dense"]) + f" | {goals} | pending |")
    else:
        ratio_keys = ("dense/ours_q4_0", "dense/ours_q4_1", "dense/ours_q8_0", "ref/ours_q4_1", "nf4/ours_q4_1")
        parts.append("| K=N | M | q4_0 us | q4_1 us | q8_0 us | % HBM q4_0 / q4_1 / q8_0 | dense us | nf4 us "
                     "| ref q4_1 us | " + " | ".join(k.replace("ours_", "") for k in ratio_keys) + " | goals |\n|"
                     + "---|" * 15)
        for r in rows:
            hbm = " / ".join(format_cell(r, n, "pct_hbm") for n in names)
            cells = [str(r["K"]), str(r["M"]), *(format_us(r, n, dry) for n in names), hbm,
                     *(format_us(r, n, dry) for n in ("dense", "ours_nf4", "ref_q4_1")),
                     *(format_ratio(r, k) for k in ratio_keys), format_goals(r)]
            parts.append("| " + " | ".join(cells) + " |")
    parts.append("")
    return parts


SECTION = Section("g", build=build_case, table=format_table, costs=contender_costs)


def main(argv=None) -> dict:
    return run_main(argv, [SECTION], "gguf_matmul", __doc__)


if __name__ == "__main__":
    main()
