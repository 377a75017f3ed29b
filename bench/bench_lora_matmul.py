"""Fused LoRA linear forward + backward: lora_matmul vs PEFT-style unfused torch ops and the base GEMM.

Section b of bench_kernels.py. One step: y = x W^T + (x A^T) B^T * s, then backward with a fixed
output gradient into x, A and B (W frozen), gradients dropped after. Contenders:
  ours     peftcore lora_matmul (one fused Triton kernel each way on CUDA; the reference elsewhere)
  unfused  PEFT-style torch ops: base(x) + lora_B(lora_A(x)) * s, autograd
  ref      lora_matmul_reference
  base     the frozen base GEMM alone, forward + dX: the floor LoRA adds to
Ours and unfused are checked against the reference. Goal (CUDA, r=16, M=8192): ours <= 1.08x base.
Timing and derived figures: kernel_harness.py.

    python bench/bench_lora_matmul.py --device cpu --quick              # CPU, seconds
    python bench/bench_lora_matmul.py --shapes "kn=8192;m=1,16,8192;r=16"
    python bench/bench_lora_matmul.py --dry-run --gpu H100             # grid, FLOPs, bytes, no timing

Prints a markdown table and writes JSON (default bench/results/lora_matmul.json).
"""
from __future__ import annotations

import torch.nn.functional as F
from kernel_cli import lora_table
from kernel_cli import main as run_main
from kernel_harness import (
    Case,
    Contender,
    Run,
    Section,
    element_size,
    fwd_bwd_cost,
    grad_step,
    lora_operands,
    triton_path,
)

SCALE = 2.0  # LoRA scaling s
RATIOS = [("ours/base", "ours", "base"), ("unfused/base", "unfused", "base"), ("ref/base", "ref", "base"),
          ("unfused/ours", "unfused", "ours")]


def contender_costs(p: dict, e: int) -> dict:
    """(FLOPs, bytes) of forward + backward: with LoRA (ours; unfused and ref alike), and the base alone."""
    M, K, N, r = p["M"], p["K"], p["N"], p["r"]
    return {"ours": fwd_bwd_cost(M, K, N, r, "dense", e), "base": fwd_bwd_cost(M, K, N, 0, "dense", e)}


def list_goals(M: int, r: int) -> list[dict]:
    """The goals for ours at a shape (CUDA runs), as evaluate_goal reads them."""
    if r == 16 and M == 8192:
        return [dict(text="fused <= 1.08x base (r=16, M=8192)", metric=("ratio", "ours/base"), op="<=", target=1.08)]
    return []


def build_case(p: dict, run: Run) -> Case:
    from peftcore.kernels.lora_matmul import lora_matmul, lora_matmul_reference

    K, N, M, r, s = p["K"], p["N"], p["M"], p["r"], SCALE
    costs = contender_costs(p, element_size(run.dtype))
    W, x, A, B, g = lora_operands(K, N, M, r, run.gen, run.dtype)
    leaves = [x, A, B]
    cs = [Contender("ours", grad_step(lambda: lora_matmul(x, W, None, A, B, s), g, leaves), *costs["ours"],
                    note="lora_matmul: " + ("fused Triton fwd + bwd" if triton_path(x) else "torch reference path")),
          Contender("unfused", grad_step(lambda: F.linear(x, W) + F.linear(F.linear(x, A), B) * s, g, leaves),
                    *costs["ours"], note="PEFT-style torch ops: base(x) + lora_B(lora_A(x)) * s"),
          Contender("ref", grad_step(lambda: lora_matmul_reference(x, W, None, A, B, s), g, leaves), *costs["ours"],
                    check=None),
          Contender("base", grad_step(lambda: F.linear(x, W), g, [x]), *costs["base"],
                    note="the frozen base GEMM alone", check=None)]
    goals = list_goals(M, r) if run.device.type == "cuda" else []
    return Case("b", dict(K=K, N=N, M=M, r=r), cs, ratios=RATIOS, goals=goals)


def describe_dry_goal(row: dict) -> str:
    return "; ".join(f"ours {g['op']} {g['target']:g}x base" for g in list_goals(row["M"], row["r"]))


def format_table(rows: list[dict], dry: bool) -> list[str]:
    return lora_table(rows, dry,
                      "b. LoRA linear forward + backward (dX, dA, dB; W frozen); ratios = time / base GEMM fwd+dX",
                      ("ours", "unfused", "ref", "base"), ("ours/base", "unfused/base", "ref/base", "unfused/ours"),
                      describe_dry_goal)


SECTION = Section("b", build=build_case, table=format_table, costs=contender_costs, lora=True)


def main(argv=None) -> dict:
    return run_main(argv, [SECTION], "lora_matmul", __doc__)


if __name__ == "__main__":
    main()
