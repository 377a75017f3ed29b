"""4-bit dequant-matmul forward y = x W'^T: quant_matmul vs bitsandbytes NF4, dense matmul, the reference.

Section a of bench_kernels.py. Contenders, on one (N, K) weight W and input x (M, K), no grad:
  ours_nf4, ours_int4   peftcore quant_matmul on NF4 and int4 (group 128) quantizations of W
  bnb_matmul_4bit       bnb.matmul_4bit on bitsandbytes' NF4 (what bnb.nn.Linear4bit runs)
  bnb_dequant_mm        bnb dequantize_4bit + F.linear
  dense                 F.linear on W in the same dtype (torch / cuBLAS / MKL)
  ref_nf4, ref_int4     quant_matmul_reference: dequantize in torch + F.linear
Ours and bnb are checked against the reference of their format (same NF4 codes). Goals (CUDA,
K=N=8192): at M <= 16 (memory-bound GEMV) >= 3.0x faster than dense and >= 75% of HBM bandwidth;
at M = 8192 (compute-bound) >= 0.9x dense. Timing and derived figures: kernel_harness.py.

    python bench/bench_quant_matmul.py --device cpu --quick          # CPU, seconds
    python bench/bench_quant_matmul.py --shapes "kn=8192;m=1,16,8192"  # CUDA: the goal shapes
    python bench/bench_quant_matmul.py --dry-run --gpu H100           # grid, FLOPs, bytes, no timing

Prints a markdown table and writes JSON (default bench/results/quant_matmul.json).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from kernel_cli import format_cell, format_goals, format_ratio, format_us
from kernel_cli import main as run_main
from kernel_harness import (
    GROUP_SIZE,
    Case,
    Contender,
    Run,
    Section,
    bnb_nf4,
    element_size,
    fwd_cost,
    raiser,
    randn,
    triton_path,
)

FORMATS = {"ours_nf4": "nf4", "ours_int4": "int4", "dense": "dense"}  # the weight each moves (ref, bnb: as ours)
RATIOS = [("dense/ours_nf4", "dense", "ours_nf4"), ("bnb/ours_nf4", "bnb_matmul_4bit", "ours_nf4"),
          ("bnb_dq/ours_nf4", "bnb_dequant_mm", "ours_nf4"), ("ref/ours_nf4", "ref_nf4", "ours_nf4"),
          ("dense/ours_int4", "dense", "ours_int4"), ("ref/ours_int4", "ref_int4", "ours_int4")]


def contender_costs(p: dict, e: int) -> dict:
    """(FLOPs, bytes) of the forward for each weight format."""
    return {name: fwd_cost(p["M"], p["K"], p["N"], fmt, e) for name, fmt in FORMATS.items()}


def list_goals(K: int, N: int, M: int, fmt: str) -> list[dict]:
    """The goals for ours in format `fmt` at a shape (CUDA runs), as evaluate_goal reads them."""
    goals = []
    if K == N == 8192:
        if M <= 16:
            goals += [dict(text=f"{fmt} M<=16: >= 3.0x faster than dense", metric=("ratio", f"dense/ours_{fmt}"),
                           op=">=", target=3.0),
                      dict(text=f"{fmt} M<=16: >= 75% of HBM", metric=("pct_hbm", f"ours_{fmt}"), op=">=", target=75.0)]
        if M == 8192:
            goals.append(dict(text=f"{fmt} M=8192: >= 0.9x dense", metric=("ratio", f"dense/ours_{fmt}"),
                              op=">=", target=0.9))
    return goals


def call_without_grad(f, *a, **kw):
    def fn():
        with torch.no_grad():
            return f(*a, **kw)
    return fn


def build_case(p: dict, run: Run) -> Case:
    from peftcore.kernels import quant
    from peftcore.kernels.quant_matmul import quant_matmul, quant_matmul_reference

    K, N, M, dtype, gen = p["K"], p["N"], p["M"], run.dtype, run.gen
    costs = contender_costs(p, element_size(dtype))
    f_nf4, f_int4 = costs["ours_nf4"], costs["ours_int4"]
    W = randn((N, K), gen, dtype, 0.02)
    x = randn((M, K), gen, dtype)
    nf4, int4 = quant.nf4_quantize(W), quant.int4_quantize(W, GROUP_SIZE)
    call = call_without_grad
    path = "Triton kernel" if triton_path(x) else "torch path"
    cs = [Contender("ours_nf4", call(quant_matmul, x, nf4), *f_nf4, note=f"quant_matmul: {path}", check="ref_nf4"),
          Contender("ours_int4", call(quant_matmul, x, int4), *f_int4, check="ref_int4"),
          Contender("dense", call(F.linear, x, W), *costs["dense"], note="torch F.linear (cuBLAS / MKL)", check=None),
          Contender("ref_nf4", call(quant_matmul_reference, x, nf4), *f_nf4, note="dequantize in torch + F.linear",
                    check=None),
          Contender("ref_int4", call(quant_matmul_reference, x, int4), *f_int4, check=None)]
    try:
        bnb, packed, state = bnb_nf4(W)
        cs += [Contender("bnb_matmul_4bit", call(bnb[0].matmul_4bit, x, packed.t(), quant_state=state), *f_nf4,
                         note="bnb.matmul_4bit (what bnb.nn.Linear4bit runs; GEMV kernel at M=1 on CUDA)",
                         check="ref_nf4"),
               Contender("bnb_dequant_mm", call(lambda: F.linear(x, bnb[1].dequantize_4bit(packed, state))), *f_nf4,
                         note="bnb dequantize_4bit + F.linear", check="ref_nf4")]
    except Exception as exc:
        cs.append(Contender("bnb_matmul_4bit", raiser(exc), *f_nf4))
    goals = [g for fmt in ("nf4", "int4") for g in list_goals(K, N, M, fmt)] if run.device.type == "cuda" else []
    return Case("a", dict(K=K, N=N, M=M), cs, ratios=RATIOS, goals=goals)


def describe_dry_goal(row: dict) -> str:
    """The goals for ours (NF4) at a shape, as a time where the roofline fixes it (75% HBM: roofline time / 0.75)."""
    c = row["contenders"]["ours_nf4"]
    parts = []
    for g in list_goals(row["K"], row["N"], row["M"], "nf4"):
        if g["metric"][0] == "ratio":
            parts.append(f"{g['op']} {g['target']:.1f}x dense")
        elif "roofline_ms" in c:  # memory-bound at M <= 16: bytes / (75% bandwidth)
            parts.append(f"<= {c['roofline_ms'] * 1e3 / (g['target'] / 100):.1f} us ({g['target']:g}% HBM)")
        else:
            parts.append(f"{g['op']} {g['target']:g}% HBM")
    return "; ".join(parts)


def format_table(rows: list[dict], dry: bool) -> list[str]:
    parts = ["### a. 4-bit forward y = x W'^T (times in us; ratios = other time / ours: > 1 means ours is faster)\n"]
    if dry:
        parts.append("| K=N | M | GFLOP | MB nf4 / int4 / dense | roofline us nf4 | int4 | dense "
                     "| goal for ours (CUDA run) "
                     "| measured |\n|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            c = r["contenders"]
            parts.append(f"| {r['K']} | {r['M']} | {c['dense']['flops'] / 1e9:.2f} "
                         f"| {c['ours_nf4']['bytes'] / 1e6:.1f} / "
                         f"{c['ours_int4']['bytes'] / 1e6:.1f} / {c['dense']['bytes'] / 1e6:.1f} | "
                         f"{format_us(r, 'ours_nf4', dry)} | {format_us(r, 'ours_int4', dry)} "
                         f"| {format_us(r, 'dense', dry)} | "
                         f"{describe_dry_goal(r)} | pending |")
    else:
        parts.append("| K=N | M | ours nf4 us | TFLOP/s | GB/s | % HBM | % roofline | ours int4 us | % HBM int4 "
                     "| dense us "
                     "| bnb matmul_4bit us | bnb dq+mm us | ref nf4 us | dense/ours nf4 | dense/ours int4 | bnb/ours "
                     "| bnb dq/ours | ref/ours | goals |\n|" + "---|" * 19)
        for r in rows:
            us = [format_us(r, n, dry) for n in ("ours_nf4", "ours_int4", "dense", "bnb_matmul_4bit", "bnb_dequant_mm",
                                                 "ref_nf4")]
            ratios = [format_ratio(r, k) for k in ("dense/ours_nf4", "dense/ours_int4", "bnb/ours_nf4",
                                                   "bnb_dq/ours_nf4", "ref/ours_nf4")]
            cells = [str(r["K"]), str(r["M"]), us[0], format_cell(r, "ours_nf4", "tflops", "sig"),
                     format_cell(r, "ours_nf4", "gbps", "sig"), format_cell(r, "ours_nf4", "pct_hbm"),
                     format_cell(r, "ours_nf4", "pct_roofline"), us[1], format_cell(r, "ours_int4", "pct_hbm"),
                     *us[2:], *ratios, format_goals(r)]
            parts.append("| " + " | ".join(cells) + " |")
    parts.append("")
    return parts


SECTION = Section("a", build=build_case, table=format_table, costs=contender_costs)


def main(argv=None) -> dict:
    return run_main(argv, [SECTION], "quant_matmul", __doc__)


if __name__ == "__main__":
    main()
