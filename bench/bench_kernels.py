"""Kernel benchmarks: 4-bit matmul, fused LoRA, QLoRA layer, and a 7B-shaped QLoRA training step.

Runs the sections of the per-kernel scripts in one process, with one grid, one JSON and one report
(`--sections`, default all); each script also runs on its own with the same flags:
  a  4-bit forward y = x W'^T, quant_matmul vs bitsandbytes NF4 and dense     bench_quant_matmul.py
  b  LoRA linear forward + backward, lora_matmul vs unfused torch ops         bench_lora_matmul.py
  c  QLoRA linear forward + backward, quant_matmul + LoraTerm vs bnb + PEFT   bench_qlora.py
  d  QLoRA training step of a 7B-shaped Llama layer vs transformers + PEFT    bench_qlora.py
Contenders and goals: each script's docstring. Timing and derived figures: kernel_harness.py.

    python bench/bench_kernels.py --device cpu --quick                  # CPU, < 2 min
    python bench/bench_kernels.py                                       # CUDA: the full grid
    python bench/bench_kernels.py --sections a,b --shapes "kn=8192;m=1,16,8192;r=16"
    python bench/bench_kernels.py --dry-run --gpu H100                  # grid, FLOPs, bytes, no timing

Prints markdown tables and writes JSON (default bench/results/kernels.json; after every section,
so a run cut short keeps what it finished).
"""
from __future__ import annotations

import bench_lora_matmul
import bench_qlora
import bench_quant_matmul
from kernel_cli import main as run_main

SECTIONS = [bench_quant_matmul.SECTION, bench_lora_matmul.SECTION, bench_qlora.LAYER, bench_qlora.STEP]


def main(argv=None) -> dict:
    return run_main(argv, SECTIONS, "kernels", __doc__)


if __name__ == "__main__":
    main()
