"""Kernel benchmarks: 4-bit matmul, fused LoRA, QLoRA layer, and a 7B-shaped QLoRA training step.

Sections (`--sections`, default all):
  a  4-bit forward y = x W'^T: ours (quant_matmul, NF4 and int4 g128) vs bitsandbytes NF4
     (bnb.matmul_4bit, what bnb.nn.Linear4bit runs, and dequantize_4bit + matmul) vs dense
     torch/cuBLAS matmul in the same dtype vs the torch reference (quant_matmul_reference).
  b  LoRA linear forward + backward (x, A, B require grad; W frozen): ours (lora_matmul: one
     fused kernel each way on CUDA) vs the unfused PEFT-style torch ops
     (x W^T + (x A^T) B^T * s, autograd) vs lora_matmul_reference vs the base GEMM alone.
  c  QLoRA linear forward + backward: ours (quant_matmul with a LoraTerm) vs bitsandbytes +
     PEFT-style unfused LoRA (bnb.matmul_4bit + (x A^T) B^T * s) vs the torch reference vs the
     dense base linear alone (fwd + dX, the floor a dense model would pay).
  d  QLoRA training step (forward, cross-entropy, backward; no optimizer) of a tiny-depth Llama
     with 7B-shaped layers (hidden 4096, intermediate 11008, 32 heads; vocab cut to 1024 so the
     7 linears dominate), NF4 base + LoRA r=16 on all 7 linears: ours
     (peftcore.get_peft_model over load_pretrained(quantize="nf4")) vs transformers
     (BitsAndBytesConfig load_in_4bit, nf4, no double quant) + HF PEFT, from one checkpoint; both
     keep the adapters in the compute dtype, neither upcasts norms (no prepare_model_for_kbit_training).

Timing: every contender of a case runs in the same process on the same tensors; after warmup,
`--repeats` rounds each run every contender once, in an order rotated round by round. Reported:
median time per contender and ratios as medians of the per-round (paired) ratios. Before timing,
each contender's output is compared with the case's reference (max relative error, in the JSON).
  CUDA: torch.cuda.Event around ONE call, after an L2 flush (zeroing a buffer of 2x the L2
  size; `--no-flush-l2` turns it off: at K=N=8192 the 36 MB NF4 weight fits the H100's 50 MB
  L2 and would read as faster than HBM) and a queued torch.cuda._sleep (`--sleep-us`, default
  1000), so the host's launch overhead overlaps the sleep and the figure is GPU time (what a
  CUDA graph would see). `--sleep-us 0` measures with host overhead.
  CPU: time.perf_counter around one call. Absolute CPU times on a shared machine are noise.

Derived figures: TFLOP/s from 2MKN (forward) or 4MKN + 6Mr(K+N) (forward + dX + dA + dB);
GB/s from the bytes a minimal implementation moves (4-bit GEMV: packed weight + scales + x + y;
fwd + bwd: the weight twice, x twice, y, dY, dX); % of roofline = max(FLOPs / peak, bytes / HBM)
/ time, with the device's figures from ROOFLINES (matched on the device name).

    python bench/bench_kernels.py --device cpu --quick                  # CPU, < 2 min
    python bench/bench_kernels.py                                       # CUDA: the full grid
    python bench/bench_kernels.py --sections a,b --shapes "kn=8192;m=1,16,8192;r=16"
    python bench/bench_kernels.py --dry-run --gpu H100                  # grid, FLOPs, bytes, no timing

Prints markdown tables and writes JSON (default bench/results/kernels.json; after every section,
so a run cut short keeps what it finished).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / "results" / "kernels.json"
SECTIONS = ("a", "b", "c", "d")
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}
LLAMA_7B_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Shape grids: K = N in `kn`, M in `m`, LoRA rank in `r` (sections b, c).
GRIDS = {
    "cuda": dict(kn=[4096, 8192], m=[1, 16, 64, 256, 2048, 8192], r=[16, 64]),
    "cuda_quick": dict(kn=[8192], m=[1, 16, 8192], r=[16]),  # the points the goals name
    "cpu": dict(kn=[1024, 2048], m=[1, 16, 256], r=[16]),
    "cpu_quick": dict(kn=[1024], m=[1, 16, 256], r=[16]),
}
# Section d: one Llama-7B decoder layer (vocab cut so the lm_head does not dominate), and a CPU toy.
LLAMA = {
    "cuda": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                 num_hidden_layers=1, vocab_size=1024, batch=1, seq=2048),
    # intermediate a multiple of 64: bitsandbytes 0.50.2's CPU dequantize_4bit is wrong when a 64-block
    # straddles two rows (K = 688: max error 5x the NF4 rounding error), and the check would flag it
    "cpu": dict(hidden_size=256, intermediate_size=704, num_attention_heads=4, num_key_value_heads=4,
                num_hidden_layers=1, vocab_size=256, batch=2, seq=64),
}
GROUP_SIZE = 128  # int4 contender

# Peak figures (dense, no sparsity): HBM TB/s, bf16/fp16 tensor-core TFLOP/s, fp32 (non-tensor) TFLOP/s.
# Matched in order on the lower-cased torch.cuda.get_device_name(): every key word must appear.
ROOFLINES = [
    (("h200",), "H200", 4.8, 989.0, 67.0),
    (("h100", "pcie"), "H100 PCIe", 2.0, 756.0, 51.0),
    (("h100", "nvl"), "H100 NVL", 3.9, 835.0, 60.0),
    (("h100",), "H100 SXM", 3.35, 989.0, 67.0),
    (("a100", "80gb"), "A100 80GB SXM", 2.039, 312.0, 19.5),
    (("a100",), "A100 40GB", 1.555, 312.0, 19.5),
]


def pick_roofline(device_name: str) -> dict | None:
    """{"label", "hbm_tbps", "tflops_16", "tflops_32"} for a device name, or None (CPU, unknown GPU)."""
    name = device_name.lower()
    for words, label, hbm, t16, t32 in ROOFLINES:
        if all(w in name for w in words):
            return {"label": label, "hbm_tbps": hbm, "tflops_16": t16, "tflops_32": t32}
    return None


def peak_tflops(roof: dict | None, dtype: torch.dtype) -> float | None:
    if roof is None:
        return None
    return roof["tflops_32"] if dtype == torch.float32 else roof["tflops_16"]


# ---------------------------------------------------------------------------------------------
# FLOPs and bytes (also what --dry-run prints)
# ---------------------------------------------------------------------------------------------
def weight_bytes(fmt: str, N: int, K: int, e: int) -> float:
    """Stored bytes of an (N, K) weight: dense at e bytes, NF4 (fp32 absmax / 64), int4 (fp32 scale + zero / group)."""
    if fmt == "dense":
        return N * K * e
    if fmt == "nf4":
        return N * K / 2 + N * K / 64 * 4
    if fmt == "int4":
        return N * K / 2 + 2 * N * K / GROUP_SIZE * 4
    raise ValueError(fmt)


def fwd_cost(M: int, K: int, N: int, fmt: str, e: int) -> tuple[float, float]:
    """(FLOPs, bytes) of y = x W^T: weight + x + y."""
    return 2.0 * M * K * N, weight_bytes(fmt, N, K, e) + e * (M * K + M * N)


def fwd_bwd_cost(M: int, K: int, N: int, r: int, fmt: str, e: int) -> tuple[float, float]:
    """(FLOPs, bytes) of forward + dX (+ dA, dB when r > 0) with W frozen.

    FLOPs: 2MKN forward + 2MKN dX; LoRA: 2Mr(K+N) forward, then dB, dY B, dA, (dY B) A: 6Mr(K+N) in all.
    Bytes: W twice, x, y, dY, dX; LoRA adds x read again (for dA) and A, B, dA, dB (h, dY B are M x r).
    """
    flops = 4.0 * M * K * N + 6.0 * M * r * (K + N)
    nbytes = 2 * weight_bytes(fmt, N, K, e) + e * (2 * M * K + 2 * M * N)
    if r:
        nbytes += e * (M * K + 4 * r * (K + N)) + 4 * 2 * M * r
    return flops, nbytes


def llama_cost(cfg: dict, r: int) -> dict:
    """Approximate FLOPs of one step (forward + backward, frozen base): linears, LoRA, attention, lm_head."""
    d, i, L, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    kv = d // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    T = cfg["batch"] * cfg["seq"]
    shapes = [(d, d), (d, kv), (d, kv), (d, d), (d, i), (d, i), (i, d)]  # (in, out) of the 7 linears
    params = sum(k * n for k, n in shapes)
    linear = L * 4.0 * T * params  # forward + dX (no dW: frozen)
    lora = L * 6.0 * T * r * sum(k + n for k, n in shapes)
    attn = L * 3 * 4.0 * cfg["batch"] * cfg["seq"] ** 2 * d  # QK^T and PV forward, twice that backward (no causal saving)
    head = 4.0 * T * d * V
    return {"tokens": T, "linear_params_per_layer": params, "flops": linear + lora + attn + head,
            "flops_linear": linear, "flops_lora": lora, "flops_attention": attn, "flops_lm_head": head,
            "nf4_bytes": L * sum(weight_bytes("nf4", n, k, 2) for k, n in shapes)}


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------
@dataclass
class Contender:
    name: str
    fn: Callable[[], torch.Tensor]  # one timed call; returns the (forward) output for the check
    flops: float
    bytes: float
    note: str = ""
    check: str | None = "ref"  # the contender whose output this one must equal; None: computes something else


@dataclass
class Case:
    section: str
    params: dict
    contenders: list[Contender]
    ratios: list[tuple[str, str, str]] = field(default_factory=list)  # (label, numerator, denominator): time ratios
    goals: list[dict] = field(default_factory=list)


class CpuTimer:
    """Wall time of one call (time.perf_counter); the process' CPU time is kept beside it (run_case)."""

    kind = "cpu: time.perf_counter around one call"

    def __init__(self):
        self.cpu_times: list[float] = []  # process CPU seconds of the calls of the last round

    def round(self, fns: list[Callable]) -> list[float]:
        out, self.cpu_times = [], []
        for fn in fns:
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
            self.cpu_times.append(time.process_time() - c0)
        return out


class CudaTimer:
    """GPU time of one call: L2 flush, queued sleep (host overhead overlaps it), event pair."""

    def __init__(self, flush_l2: bool, sleep_us: float):
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        l2 = getattr(props, "L2_cache_size", 0) or 50 * 2**20
        self.flush = torch.empty(max(2 * l2, 128 * 2**20), dtype=torch.int8, device="cuda") if flush_l2 else None
        clock_khz = getattr(props, "clock_rate", 0) or 1_800_000  # SM clock; the sleep needs only its order
        self.sleep_cycles = int(sleep_us * clock_khz / 1e3) if hasattr(torch.cuda, "_sleep") else 0
        self.kind = (f"cuda: event pair around one call; L2 flush {'on' if flush_l2 else 'off'}; "
                     f"queued sleep {sleep_us:g} us")

    def round(self, fns: list[Callable]) -> list[float]:
        events = []
        for fn in fns:
            if self.flush is not None:
                self.flush.zero_()
            if self.sleep_cycles:
                torch.cuda._sleep(self.sleep_cycles)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize()
        return [s.elapsed_time(e) / 1e3 for s, e in events]


# Output agreement (max |a - b| / max |b|) every checked contender must reach: fp32 dots are tf32 on
# NVIDIA GPUs (~1e-3); 16-bit outputs round to 8 / 11 bits and accumulate in another order.
CHECK_TOL = {torch.float32: 2e-3, torch.float16: 2e-2, torch.bfloat16: 4e-2}


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def metrics(seconds: float, flops: float, nbytes: float, roof: dict | None, dtype: torch.dtype) -> dict:
    out = {"median_ms": seconds * 1e3, "tflops": flops / seconds / 1e12, "gbps": nbytes / seconds / 1e9,
           "flops": flops, "bytes": nbytes}
    peak = peak_tflops(roof, dtype)
    if roof is not None and peak:
        t_roof = max(flops / (peak * 1e12), nbytes / (roof["hbm_tbps"] * 1e12))
        out.update(pct_hbm=100 * out["gbps"] / (roof["hbm_tbps"] * 1e3), pct_flops=100 * out["tflops"] / peak,
                   roofline_ms=t_roof * 1e3, pct_roofline=100 * t_roof / seconds)
    return out


def run_case(case: Case, timer, warmup: int, repeats: int, roof: dict | None, dtype: torch.dtype) -> dict:
    """Check, warm up, then `repeats` rotated rounds; -> the case's JSON row."""
    row = {"section": case.section, **case.params, "contenders": {}, "errors": {}, "check_max_rel_err": {}}
    outputs, live = {}, []
    for c in case.contenders:
        try:
            outputs[c.name] = c.fn().detach().clone()  # first call: autotuning, compilation, the check output
            for _ in range(warmup):
                c.fn()
            live.append(c)
        except Exception as exc:  # one contender failing (bnb without a GPU build, OOM) must not end the run
            row["errors"][c.name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    tol = CHECK_TOL[dtype]
    row["check_tol"], row["check_failed"] = tol, []
    for c in case.contenders:
        if c.check and c.name in outputs and c.check in outputs:
            err = row["check_max_rel_err"][c.name] = max_rel_err(outputs[c.name], outputs[c.check])
            if not err <= tol:
                row["check_failed"].append(f"{c.name} vs {c.check}: {err:.1e}")
    del outputs
    times = {c.name: [] for c in live}
    cpu = {c.name: [] for c in live}  # CPU timer only: process CPU seconds, steadier on a busy machine
    for i in range(repeats):
        order = live[i % len(live):] + live[: i % len(live)] if live else []
        for c, t in zip(order, timer.round([c.fn for c in order])):
            times[c.name].append(t)
        for c, t in zip(order, getattr(timer, "cpu_times", [])):
            cpu[c.name].append(t)
    for c in live:
        row["contenders"][c.name] = dict(metrics(statistics.median(times[c.name]), c.flops, c.bytes, roof, dtype),
                                         times_ms=[t * 1e3 for t in times[c.name]], note=c.note)
        if cpu[c.name]:
            row["contenders"][c.name]["median_cpu_ms"] = statistics.median(cpu[c.name]) * 1e3
    row["ratios"], row["ratios_cpu_time"] = {}, {}
    for label, num, den in case.ratios:
        if num in times and den in times and times[num]:
            row["ratios"][label] = statistics.median(a / b for a, b in zip(times[num], times[den]))
            if cpu[num] and all(cpu[den]):
                row["ratios_cpu_time"][label] = statistics.median(a / b for a, b in zip(cpu[num], cpu[den]))
    row["goals"] = [evaluate_goal(g, row) for g in case.goals]
    return row


def evaluate_goal(goal: dict, row: dict) -> dict:
    """goal: {"text", "metric": ("ratio", label) or ("pct_hbm", contender), "op": ">=" or "<=", "target"}."""
    kind, key = goal["metric"]
    value = row["ratios"].get(key) if kind == "ratio" else row["contenders"].get(key, {}).get(kind)
    ok = None if value is None else (value >= goal["target"] if goal["op"] == ">=" else value <= goal["target"])
    return {"text": goal["text"], "value": value, "target": goal["target"], "op": goal["op"], "met": ok}


# ---------------------------------------------------------------------------------------------
# Contenders
# ---------------------------------------------------------------------------------------------
def import_bnb():
    """(bitsandbytes, bitsandbytes.functional) or the import error's text."""
    try:
        import bitsandbytes
        import bitsandbytes.functional as bnb_f

        return bitsandbytes, bnb_f
    except Exception as exc:  # not installed, or no binary for this platform
        return f"{type(exc).__name__}: {exc}"


def bnb_nf4(W: torch.Tensor):
    """bitsandbytes' NF4 of W (blocksize 64, no double quantization: BitsAndBytesConfig's defaults)."""
    bnb = import_bnb()
    if isinstance(bnb, str):
        raise RuntimeError(f"bitsandbytes unavailable: {bnb}")
    packed, state = bnb[1].quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=False)
    return bnb, packed, state


def grad_step(forward: Callable[[], torch.Tensor], g: torch.Tensor, leaves: list[torch.Tensor]):
    """One forward + backward(g), gradients dropped after; returns the output."""
    def fn():
        y = forward()
        y.backward(g)
        for t in leaves:
            t.grad = None
        return y
    return fn


def randn(shape: tuple, gen: torch.Generator, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """Normal values drawn on the generator's device (a 8192 x 8192 draw on CPU would take ~0.5 s)."""
    t = torch.randn(shape, generator=gen, device=gen.device)
    return (t.mul_(scale) if scale != 1.0 else t).to(dtype)


def section_a(K: int, N: int, M: int, device, dtype, gen) -> Case:
    from peftcore.kernels import quant
    from peftcore.kernels.quant_matmul import quant_matmul, quant_matmul_reference

    e = torch.empty(0, dtype=dtype).element_size()
    W = randn((N, K), gen, dtype, 0.02)
    x = randn((M, K), gen, dtype)
    nf4, int4 = quant.nf4_quantize(W), quant.int4_quantize(W, GROUP_SIZE)
    f_nf4, f_int4, f_dense = fwd_cost(M, K, N, "nf4", e), fwd_cost(M, K, N, "int4", e), fwd_cost(M, K, N, "dense", e)
    no_grad = torch.no_grad

    def call(f, *a, **kw):
        def fn():
            with no_grad():
                return f(*a, **kw)
        return fn

    path = "Triton kernel" if triton_path(x) else "torch path"
    cs = [Contender("ours_nf4", call(quant_matmul, x, nf4), *f_nf4, note=f"quant_matmul: {path}", check="ref_nf4"),
          Contender("ours_int4", call(quant_matmul, x, int4), *f_int4, check="ref_int4"),
          Contender("dense", call(F.linear, x, W), *f_dense, note="torch F.linear (cuBLAS / MKL)", check=None),
          Contender("ref_nf4", call(quant_matmul_reference, x, nf4), *f_nf4, note="dequantize in torch + F.linear",
                    check=None),
          Contender("ref_int4", call(quant_matmul_reference, x, int4), *f_int4, check=None)]
    try:
        bnb, packed, state = bnb_nf4(W)
        cs += [Contender("bnb_matmul_4bit", call(bnb[0].matmul_4bit, x, packed.t(), quant_state=state), *f_nf4,
                         note="bnb.matmul_4bit (what bnb.nn.Linear4bit runs; GEMV kernel at M=1 on CUDA)", check="ref_nf4"),
               Contender("bnb_dequant_mm", call(lambda: F.linear(x, bnb[1].dequantize_4bit(packed, state))), *f_nf4,
                         note="bnb dequantize_4bit + F.linear", check="ref_nf4")]
    except Exception as exc:
        cs.append(Contender("bnb_matmul_4bit", _raiser(exc), *f_nf4))
    ratios = [("dense/ours_nf4", "dense", "ours_nf4"), ("bnb/ours_nf4", "bnb_matmul_4bit", "ours_nf4"),
              ("bnb_dq/ours_nf4", "bnb_dequant_mm", "ours_nf4"), ("ref/ours_nf4", "ref_nf4", "ours_nf4"),
              ("dense/ours_int4", "dense", "ours_int4"), ("ref/ours_int4", "ref_int4", "ours_int4")]
    goals = []
    if device.type == "cuda" and K == N == 8192:
        for fmt in ("nf4", "int4"):
            if M <= 16:
                goals += [dict(text=f"{fmt} M<=16: >= 3.0x faster than dense", metric=("ratio", f"dense/ours_{fmt}"),
                               op=">=", target=3.0),
                          dict(text=f"{fmt} M<=16: >= 75% of HBM", metric=("pct_hbm", f"ours_{fmt}"), op=">=", target=75.0)]
            if M == 8192:
                goals.append(dict(text=f"{fmt} M=8192: >= 0.9x dense", metric=("ratio", f"dense/ours_{fmt}"),
                                  op=">=", target=0.9))
    return Case("a", dict(K=K, N=N, M=M), cs, ratios=ratios, goals=goals)


def triton_path(x: torch.Tensor) -> bool:
    """Whether peftcore's kernels take Triton for x (CUDA, or CPU under TRITON_INTERPRET=1)."""
    from peftcore.kernels import dispatch

    return dispatch.use_triton(x)


def _raiser(exc: Exception):
    def fn():
        raise exc
    return fn


def lora_operands(K, N, M, r, device, dtype, gen):
    W = randn((N, K), gen, dtype, 0.02)
    x = randn((M, K), gen, dtype).requires_grad_(True)
    A = randn((r, K), gen, dtype, 1 / math.sqrt(K)).requires_grad_(True)
    B = randn((N, r), gen, dtype, 0.02).requires_grad_(True)
    g = randn((M, N), gen, dtype)
    return W, x, A, B, g


def section_b(K: int, N: int, M: int, r: int, device, dtype, gen) -> Case:
    from peftcore.kernels.lora_matmul import lora_matmul, lora_matmul_reference

    e = torch.empty(0, dtype=dtype).element_size()
    W, x, A, B, g = lora_operands(K, N, M, r, device, dtype, gen)
    s = 2.0
    cost, base_cost = fwd_bwd_cost(M, K, N, r, "dense", e), fwd_bwd_cost(M, K, N, 0, "dense", e)
    leaves = [x, A, B]
    on_cuda = device.type == "cuda"
    cs = [Contender("ours", grad_step(lambda: lora_matmul(x, W, None, A, B, s), g, leaves), *cost,
                    note="lora_matmul: " + ("fused Triton fwd + bwd" if triton_path(x) else "torch reference path")),
          Contender("unfused", grad_step(lambda: F.linear(x, W) + F.linear(F.linear(x, A), B) * s, g, leaves), *cost,
                    note="PEFT-style torch ops: base(x) + lora_B(lora_A(x)) * s"),
          Contender("ref", grad_step(lambda: lora_matmul_reference(x, W, None, A, B, s), g, leaves), *cost, check=None),
          Contender("base", grad_step(lambda: F.linear(x, W), g, [x]), *base_cost, note="the frozen base GEMM alone",
                    check=None)]
    ratios = [("ours/base", "ours", "base"), ("unfused/base", "unfused", "base"), ("ref/base", "ref", "base"),
              ("unfused/ours", "unfused", "ours")]
    goals = []
    if on_cuda and r == 16 and M == 8192:
        goals.append(dict(text="fused <= 1.08x base (r=16, M=8192)", metric=("ratio", "ours/base"), op="<=", target=1.08))
    return Case("b", dict(K=K, N=N, M=M, r=r), cs, ratios=ratios, goals=goals)


def section_c(K: int, N: int, M: int, r: int, device, dtype, gen) -> Case:
    from peftcore.kernels import quant
    from peftcore.kernels.quant_matmul import LoraTerm, quant_matmul, quant_matmul_reference

    e = torch.empty(0, dtype=dtype).element_size()
    W, x, A, B, g = lora_operands(K, N, M, r, device, dtype, gen)
    s = 2.0
    nf4 = quant.nf4_quantize(W)
    cost = fwd_bwd_cost(M, K, N, r, "nf4", e)
    leaves = [x, A, B]
    cs = [Contender("ours", grad_step(lambda: quant_matmul(x, nf4, lora=LoraTerm(A, B, s)), g, leaves), *cost,
                    note="quant_matmul + LoraTerm: " + ("Triton kernels" if triton_path(x) else "torch path")),
          Contender("ref", grad_step(lambda: quant_matmul_reference(x, nf4, lora=LoraTerm(A, B, s)), g, leaves), *cost,
                    check=None),
          Contender("dense_base", grad_step(lambda: F.linear(x, W), g, [x]), *fwd_bwd_cost(M, K, N, 0, "dense", e),
                    note="dense base linear alone, fwd + dX", check=None)]
    try:
        bnb, packed, state = bnb_nf4(W)
        qt = packed.t()
        cs.append(Contender("bnb_peft", grad_step(
            lambda: bnb[0].matmul_4bit(x, qt, quant_state=state) + F.linear(F.linear(x, A), B) * s, g, leaves), *cost,
            note="bnb.matmul_4bit + PEFT-style unfused LoRA"))
    except Exception as exc:
        cs.append(Contender("bnb_peft", _raiser(exc), *cost))
    ratios = [("bnb_peft/ours", "bnb_peft", "ours"), ("ref/ours", "ref", "ours"), ("ours/dense_base", "ours", "dense_base")]
    return Case("c", dict(K=K, N=N, M=M, r=r), cs, ratios=ratios)


def section_d(cfg: dict, r: int, device, dtype, gen) -> Case:
    """Ours vs transformers + bitsandbytes + HF PEFT, both loaded from one saved random checkpoint."""
    import peft
    import transformers

    import peftcore
    from peftcore.models import load_pretrained

    hf_keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
               "num_hidden_layers", "vocab_size")
    hf_config = transformers.LlamaConfig(**{k: cfg[k] for k in hf_keys}, max_position_embeddings=max(2048, cfg["seq"]))
    lora_kw = dict(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=list(LLAMA_7B_LINEARS))
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        dense = transformers.LlamaForCausalLM(hf_config)  # on CPU: ~0.8 GB fp32 at the 7B layer shape
        dense.to(dtype).save_pretrained(folder)
        del dense
        ours = load_pretrained(folder, dtype=dtype, device=device, quantize="nf4")
        ours = peftcore.get_peft_model(ours, peftcore.LoraConfig(**lora_kw)).train()
        bnb_config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                     bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=False)
        device_map = {"": torch.cuda.current_device()} if device.type == "cuda" else "cpu"
        try:  # transformers 5 calls it `dtype`, 4.x `torch_dtype`
            hf = transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=bnb_config, dtype=dtype,
                                                                   device_map=device_map)
        except TypeError:
            hf = transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=bnb_config,
                                                                   torch_dtype=dtype, device_map=device_map)
        # Like for like: no prepare_model_for_kbit_training (it upcasts norms and embeddings to fp32), and
        # adapters kept in the compute dtype as ours are (PEFT's default autocast_adapter_dtype=True would
        # hold bf16 adapters in fp32, a dtype choice rather than an implementation difference).
        hf = peft.get_peft_model(hf, peft.LoraConfig(**lora_kw), autocast_adapter_dtype=False).train()
    V, T = cfg["vocab_size"], cfg["batch"] * cfg["seq"]
    ids = torch.randint(0, V, (cfg["batch"], cfg["seq"]), generator=gen, device=gen.device)
    labels = ids.view(-1)

    def step(model, forward):
        params = [p for p in model.parameters() if p.requires_grad]

        def fn():
            logits = forward()
            F.cross_entropy(logits.float().view(T, V), labels).backward()
            for p in params:
                p.grad = None
            return logits
        return fn

    cost = llama_cost(cfg, r)
    probe = torch.empty(1, cfg["hidden_size"], dtype=dtype, device=device)
    from peftcore.lora import LoraLinear
    lora_layers = [m for m in ours.modules() if isinstance(m, LoraLinear)]
    hf_4bit = sum(type(m).__module__.startswith("bitsandbytes") and type(m).__name__ == "Linear4bit" for m in hf.modules())
    params = dict(**{k: cfg[k] for k in hf_keys}, batch=cfg["batch"], seq=cfg["seq"], r=r, tokens=T,
                  ours_lora_layers=len(lora_layers), ours_fused_layers=sum(m.can_fuse(probe, None) for m in lora_layers),
                  hf_linear4bit_layers=hf_4bit, cost=cost,
                  lora_dtypes={name: str(next(p for n, p in m.named_parameters() if "lora_A" in n).dtype)
                               for name, m in (("ours", ours), ("hf", hf))})
    # LoRA B starts at zero on both sides, and both quantize to the same NF4 codes: equal logits
    cs = [Contender("ours", step(ours, lambda: ours(ids)), cost["flops"], cost["nf4_bytes"],
                    note="peftcore.get_peft_model(load_pretrained(quantize='nf4'))", check="hf_peft_bnb"),
          Contender("hf_peft_bnb", step(hf, lambda: hf(input_ids=ids, use_cache=False).logits), cost["flops"],
                    cost["nf4_bytes"], note="transformers BitsAndBytesConfig(load_in_4bit) + HF PEFT", check=None)]
    case = Case("d", params, cs, ratios=[("hf/ours", "hf_peft_bnb", "ours")])
    case.models = (ours, hf)  # kept alive for the peak-memory pass
    return case


def step_peak_memory(case: Case) -> dict:
    """CUDA: peak allocated bytes during one step of each contender, above what was allocated before it."""
    out = {}
    for c in case.contenders:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        try:
            c.fn()
        except Exception:
            continue
        torch.cuda.synchronize()
        out[c.name] = torch.cuda.max_memory_allocated() - before
    return out


# ---------------------------------------------------------------------------------------------
# Grid, dry run, markdown
# ---------------------------------------------------------------------------------------------
def parse_shapes(spec: str | None, base: dict) -> dict:
    """"kn=1024,2048;m=1,16;r=16" -> the grid, keys not given taken from `base` (k=n is an alias of kn)."""
    grid = {k: list(v) for k, v in base.items()}
    if not spec:
        return grid
    for part in spec.replace(" ", "").lower().replace("k=n=", "kn=").split(";"):
        if not part:
            continue
        key, _, values = part.partition("=")
        key = {"k": "kn", "n": "kn"}.get(key, key)
        if key not in ("kn", "m", "r") or not values:
            raise SystemExit(f"--shapes: cannot read {part!r}; expected e.g. 'kn=4096,8192;m=1,16;r=16'")
        grid[key] = [int(v) for v in values.split(",") if v]
    return grid


def enumerate_cases(grid: dict, sections: tuple[str, ...]) -> list[tuple[str, dict]]:
    out = []
    for sec in sections:
        if sec == "d":
            continue
        for kn in grid["kn"]:
            for m in grid["m"]:
                for r in ([None] if sec == "a" else grid["r"]):
                    out.append((sec, dict(K=kn, N=kn, M=m) | ({} if r is None else {"r": r})))
    return out


# (contender, weight format, with LoRA): bnb / unfused / reference move the same useful bytes as ours
DRY_CONTENDERS = {"a": [("ours_nf4", "nf4", False), ("ours_int4", "int4", False), ("dense", "dense", False)],
                  "b": [("ours", "dense", True), ("base", "dense", False)],
                  "c": [("ours", "nf4", True), ("dense_base", "dense", False)]}


def dry_run(grid: dict, sections: tuple[str, ...], roof: dict | None, dtype: torch.dtype, llama: dict, r_d: int) -> list[dict]:
    """Rows with FLOPs, bytes and roofline times (no tensors, no timing): what the CUDA run will fill in."""
    e = torch.empty(0, dtype=dtype).element_size()
    rows = []
    for sec, p in enumerate_cases(grid, sections):
        row = {"section": sec, **p, "contenders": {}}
        for name, fmt, lora in DRY_CONTENDERS[sec]:
            if sec == "a":
                flops, nbytes = fwd_cost(p["M"], p["K"], p["N"], fmt, e)
            else:
                flops, nbytes = fwd_bwd_cost(p["M"], p["K"], p["N"], p["r"] if lora else 0, fmt, e)
            c = {"flops": flops, "bytes": nbytes}
            peak = peak_tflops(roof, dtype)
            if roof is not None:
                c["roofline_ms"] = 1e3 * max(flops / (peak * 1e12), nbytes / (roof["hbm_tbps"] * 1e12))
            row["contenders"][name] = c
        rows.append(row)
    if "d" in sections:
        rows.append({"section": "d", **{k: v for k, v in llama.items()}, "r": r_d, "cost": llama_cost(llama, r_d),
                     "contenders": {}})
    return rows


def _f(v, spec=".1f", missing="—"):
    return missing if v is None else format(v, spec)


def _c(row: dict, name: str, key: str, spec=".1f", scale=1.0):
    v = row["contenders"].get(name, {}).get(key)
    if v is None:
        return "—"
    v *= scale
    return format(v, ".3g") if spec == "sig" or (v and abs(v) < 0.1) else format(v, spec)


def _ratio(row: dict, key: str, spec: str = ".2f") -> str:
    """Paired median of a time ratio; on CPU also the ratio of process CPU times ("wall / cpu")."""
    wall, cpu = row.get("ratios", {}).get(key), row.get("ratios_cpu_time", {}).get(key)
    text = "—" if wall is None else format(wall, spec) + "x"
    return text if cpu is None else f"{text} / {cpu:{spec}}x"


def _goals(row: dict) -> str:
    gs = row.get("goals") or []
    return "; ".join(f"{'PASS' if g['met'] else ('FAIL' if g['met'] is False else '?')} {g['text']} "
                     f"({_f(g['value'], '.2f')})" for g in gs)


def dry_goal(row: dict) -> str:
    """The issue's goals for a section-a shape, as a time ours must beat where the roofline fixes it."""
    if row["K"] != 8192 or row["N"] != 8192:
        return ""
    c = row["contenders"]["ours_nf4"]
    if row["M"] <= 16 and "roofline_ms" in c:
        # 75% of HBM: bytes / (0.75 * bandwidth) = roofline time / 0.75 (memory-bound at M <= 16)
        return f">= 3.0x dense; <= {c['roofline_ms'] * 1e3 / 0.75:.1f} us (75% HBM)"
    if row["M"] <= 16:
        return ">= 3.0x dense; >= 75% HBM"
    return ">= 0.9x dense" if row["M"] == 8192 else ""


def markdown(rows: list[dict], dry: bool = False) -> str:
    """One table per section. Times in us (a, b, c) or ms (d); ratios are paired medians of time ratios."""
    parts = []
    by = {s: [r for r in rows if r["section"] == s] for s in SECTIONS}
    us = lambda row, n: _c(row, n, "roofline_ms" if dry else "median_ms", ".1f", 1e3)  # noqa: E731
    if by["a"]:
        parts.append("### a. 4-bit forward y = x W'^T (times in us; ratios = other time / ours: > 1 means ours is faster)\n")
        if dry:
            parts.append("| K=N | M | GFLOP | MB nf4 / int4 / dense | roofline us nf4 | int4 | dense | goal for ours (CUDA run) "
                         "| measured |\n|---|---|---|---|---|---|---|---|---|")
            for r in by["a"]:
                c = r["contenders"]
                parts.append(f"| {r['K']} | {r['M']} | {c['dense']['flops'] / 1e9:.2f} | {c['ours_nf4']['bytes'] / 1e6:.1f} / "
                             f"{c['ours_int4']['bytes'] / 1e6:.1f} / {c['dense']['bytes'] / 1e6:.1f} | {us(r, 'ours_nf4')} | "
                             f"{us(r, 'ours_int4')} | {us(r, 'dense')} | {dry_goal(r)} | pending |")
        else:
            parts.append("| K=N | M | ours nf4 us | TFLOP/s | GB/s | % HBM | % roofline | ours int4 us | % HBM int4 | dense us "
                         "| bnb matmul_4bit us | bnb dq+mm us | ref nf4 us | dense/ours nf4 | dense/ours int4 | bnb/ours "
                         "| bnb dq/ours | ref/ours | goals |\n|" + "---|" * 19)
            for r in by["a"]:
                q = r["ratios"]
                parts.append(f"| {r['K']} | {r['M']} | {us(r, 'ours_nf4')} | {_c(r, 'ours_nf4', 'tflops', 'sig')} | "
                             f"{_c(r, 'ours_nf4', 'gbps', 'sig')} | {_c(r, 'ours_nf4', 'pct_hbm')} | {_c(r, 'ours_nf4', 'pct_roofline')} | "
                             f"{us(r, 'ours_int4')} | {_c(r, 'ours_int4', 'pct_hbm')} | {us(r, 'dense')} | {us(r, 'bnb_matmul_4bit')} | "
                             f"{us(r, 'bnb_dequant_mm')} | {us(r, 'ref_nf4')} | {_ratio(r, 'dense/ours_nf4')} | "
                             f"{_ratio(r, 'dense/ours_int4')} | {_ratio(r, 'bnb/ours_nf4')} | "
                             f"{_ratio(r, 'bnb_dq/ours_nf4')} | {_ratio(r, 'ref/ours_nf4')} | {_goals(r)} |")
        parts.append("")
    for sec, title, names, ratio_keys in (
            ("b", "b. LoRA linear forward + backward (dX, dA, dB; W frozen); ratios = time / base GEMM fwd+dX",
             ("ours", "unfused", "ref", "base"), ("ours/base", "unfused/base", "ref/base", "unfused/ours")),
            ("c", "c. QLoRA linear (NF4 base + LoRA) forward + backward; ratios = time ratios",
             ("ours", "bnb_peft", "ref", "dense_base"), ("bnb_peft/ours", "ref/ours", "ours/dense_base"))):
        if not by[sec]:
            continue
        parts.append(f"### {title}\n")
        if dry:
            base = names[-1]
            parts.append(f"| K=N | M | r | GFLOP | MB ours | roofline us ours | roofline us {base} | goal | measured |\n|"
                         + "---|" * 9)
            for r in by[sec]:
                c = r["contenders"]
                goal = "ours <= 1.08x base" if sec == "b" and r["r"] == 16 and r["M"] == 8192 else ""
                parts.append(f"| {r['K']} | {r['M']} | {r['r']} | {c['ours']['flops'] / 1e9:.2f} | {c['ours']['bytes'] / 1e6:.1f} | "
                             f"{us(r, 'ours')} | {us(r, base)} | {goal} | pending |")
        else:
            parts.append("| K=N | M | r | " + " | ".join(f"{n} us" for n in names) + " | ours TFLOP/s | ours % roofline | "
                         + " | ".join(ratio_keys) + " | goals |\n|" + "---|" * (3 + len(names) + 2 + len(ratio_keys) + 1))
            for r in by[sec]:
                parts.append(f"| {r['K']} | {r['M']} | {r['r']} | " + " | ".join(us(r, n) for n in names)
                             + f" | {_c(r, 'ours', 'tflops', 'sig')} | {_c(r, 'ours', 'pct_roofline')} | "
                             + " | ".join(_ratio(r, k, ".3f") for k in ratio_keys) + f" | {_goals(r)} |")
        parts.append("")
    if by["d"]:
        parts.append("### d. QLoRA training step (forward + CE + backward), Llama-7B-shaped layers, NF4 + LoRA on 7 linears\n")
        for r in by["d"]:
            shape = (f"hidden {r['hidden_size']}, intermediate {r['intermediate_size']}, {r['num_attention_heads']} heads, "
                     f"{r['num_hidden_layers']} layer(s), vocab {r['vocab_size']}, batch {r['batch']} x seq {r['seq']}, r={r['r']}")
            cost = r["cost"]
            if dry:
                parts.append(f"{shape}: {cost['tokens']} tokens, ~{cost['flops'] / 1e12:.2f} TFLOP per step "
                             f"(linears {cost['flops_linear'] / 1e12:.2f}, attention {cost['flops_attention'] / 1e12:.2f}), "
                             f"NF4 weights {cost['nf4_bytes'] / 1e6:.0f} MB: pending")
                continue
            parts.append(f"{shape}; LoRA layers fused: {r.get('ours_fused_layers')} / {r.get('ours_lora_layers')} (ours), "
                         f"bnb Linear4bit layers: {r.get('hf_linear4bit_layers')} (HF)\n")
            parts.append("| contender | step ms | tokens/s | TFLOP/s (approx.) | peak step MiB | hf/ours |\n|---|---|---|---|---|---|")
            for n in ("ours", "hf_peft_bnb"):
                c = r["contenders"].get(n)
                if c is None:
                    parts.append(f"| {n} | error: {r['errors'].get(n, '?')} | | | | |")
                    continue
                mem = r.get("peak_step_bytes", {}).get(n)
                parts.append(f"| {n} | {c['median_ms']:.1f} | {cost['tokens'] / c['median_ms'] * 1e3:.0f} | {c['tflops']:.3g} | "
                             f"{_f(None if mem is None else mem / 2**20, '.0f')} | "
                             f"{_ratio(r, 'hf/ours', '.3f') if n == 'ours' else ''} |")
        parts.append("")
    errors = [(r["section"], {k: v for k, v in r.items() if k in ("K", "M", "r")}, n, e)
              for r in rows for n, e in (r.get("errors") or {}).items()]
    if errors:
        parts.append("Contenders that failed: " + "; ".join(f"{s} {p} {n}: {e}" for s, p, n, e in errors[:12]))
    if not dry:
        bad = [(r["section"], {k: v for k, v in r.items() if k in ("K", "M", "r")}, f)
               for r in rows for f in r.get("check_failed", [])]
        checked = sum(len(r.get("check_max_rel_err", {})) for r in rows)
        parts.append(f"Output check: {checked} contender outputs compared with their reference; "
                     + ("all agree within tolerance." if not bad else
                        "DISAGREE: " + "; ".join(f"{s} {p} {f}" for s, p, f in bad[:12])))
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cpu")
    p.add_argument("--dtype", default="auto", help="bf16 / fp16 / fp32; auto = bf16 on CUDA, fp32 on CPU")
    p.add_argument("--shapes", help="grid override, e.g. 'kn=4096,8192;m=1,16,64;r=16,64' (keys kn, m, r)")
    p.add_argument("--sections", default="a,b,c,d", help="comma-separated subset of a,b,c,d")
    p.add_argument("--quick", action="store_true", help="small grid and few repeats (CPU: < 2 min)")
    p.add_argument("--warmup", type=int, help="untimed calls per contender after the first (default 5 CUDA, 1 CPU)")
    p.add_argument("--repeats", type=int, help="timed rounds (default CUDA 30 / quick 10, CPU 5 / quick 3)")
    p.add_argument("--rank-d", type=int, default=16, help="LoRA rank of section d")
    p.add_argument("--llama", help="section d override, e.g. 'batch=2,seq=1024,num_hidden_layers=2'")
    p.add_argument("--no-flush-l2", action="store_true", help="CUDA: do not flush L2 before each timed call")
    p.add_argument("--sleep-us", type=float, default=1000.0, help="CUDA: queued sleep before each timed call (0: off)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default on CPU: 1)")
    p.add_argument("--dry-run", action="store_true", help="enumerate the (CUDA) grid with FLOPs / bytes / roofline; no timing")
    p.add_argument("--gpu", default=None, help="device name for --dry-run's roofline (default: this GPU, else H100)")
    p.add_argument("--out", type=Path, default=None, help=f"JSON path (default {RESULTS.relative_to(RESULTS.parents[2])})")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def resolve(args) -> tuple[torch.device, torch.dtype]:
    name = args.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if args.dry_run and args.device == "auto":
        name = "cuda"  # a dry run describes the GPU grid unless told otherwise
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available() and not args.dry_run:
        raise SystemExit("--device cuda: no CUDA device here; run with --device cpu, or --dry-run to see the CUDA grid")
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    elif args.dtype in DTYPES:
        dtype = DTYPES[args.dtype]
    else:
        raise SystemExit(f"--dtype {args.dtype!r}: choose from {sorted(DTYPES)}")
    return device, dtype


def llama_config(device: torch.device, override: str | None) -> dict:
    cfg = dict(LLAMA["cuda" if device.type == "cuda" else "cpu"])
    for part in (override or "").replace(" ", "").split(","):
        if part:
            k, _, v = part.partition("=")
            if k not in cfg:
                raise SystemExit(f"--llama: unknown key {k!r}; keys: {', '.join(cfg)}")
            cfg[k] = int(v)
    return cfg


def environment(device: torch.device, dtype: torch.dtype, timer_kind: str, roof: dict | None) -> dict:
    env = {"device": device.type, "dtype": str(dtype).replace("torch.", ""), "torch": torch.__version__,
           "python": platform.python_version(), "machine": platform.processor() or platform.machine(),
           "threads": torch.get_num_threads(), "timer": timer_kind, "roofline": roof,
           "date": time.strftime("%Y-%m-%d"), "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1"}
    if device.type == "cuda" and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    for mod in ("triton", "bitsandbytes", "transformers", "peft"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception as exc:  # noqa: BLE001 - a missing optional package is information, not an error
            env[mod] = f"unavailable ({type(exc).__name__})"
    return env


def write(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")


def main(argv=None) -> dict:
    args = parse_args(argv)
    device, dtype = resolve(args)
    if args.threads or device.type == "cpu":
        # CPU default 1 thread: on a shared 2-core box two threads wait on each other (measured:
        # a 16 x 1024 x 1024 fp32 matmul took 0.5 ms on one thread, 32 ms on two under load)
        torch.set_num_threads(args.threads or 1)
    sections = tuple(s for s in args.sections.replace(" ", "").split(",") if s)
    if bad := [s for s in sections if s not in SECTIONS]:
        raise SystemExit(f"--sections: unknown {bad}; choose from {','.join(SECTIONS)}")
    key = ("cuda" if device.type == "cuda" else "cpu") + ("_quick" if args.quick else "")
    grid = parse_shapes(args.shapes, GRIDS[key])
    llama = llama_config(device, args.llama)

    if args.dry_run:
        gpu = args.gpu or (torch.cuda.get_device_name() if torch.cuda.is_available() else "H100")
        roof = pick_roofline(gpu) if device.type == "cuda" else None
        rows = dry_run(grid, sections, roof, dtype, llama, args.rank_d)
        result = {"dry_run": True, "env": environment(device, dtype, "none (dry run)", roof), "grid": grid, "rows": rows}
        out = args.out or RESULTS.with_name("kernels_dryrun.json")
        write(out, result)
        print(f"Dry run: {len([r for r in rows if r['section'] != 'd'])} cases on {gpu} figures "
              f"({roof['label'] if roof else 'no roofline'}), {result['env']['dtype']}; no timing.\n")
        print(markdown(rows, dry=True))
        print(f"wrote {out}")
        return result

    on_cuda = device.type == "cuda"
    if on_cuda:
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        torch.cuda.set_device(device)
    roof = pick_roofline(torch.cuda.get_device_name()) if on_cuda else None
    timer = CudaTimer(not args.no_flush_l2, args.sleep_us) if on_cuda else CpuTimer()
    warmup = args.warmup if args.warmup is not None else (5 if on_cuda else 1)
    repeats = args.repeats or ((10 if args.quick else 30) if on_cuda else (3 if args.quick else 5))
    out = args.out or RESULTS
    result = {"dry_run": False, "env": environment(device, dtype, timer.kind, roof), "grid": grid, "llama": llama,
              "warmup": warmup, "repeats": repeats, "argv": sys.argv[1:] if argv is None else list(argv), "rows": []}
    gen = torch.Generator(device=device).manual_seed(args.seed)
    builders = {"a": section_a, "b": section_b, "c": section_c}
    t_start = time.perf_counter()
    for sec in sections:
        cases = [(sec, None)] if sec == "d" else [c for c in enumerate_cases(grid, (sec,))]
        for _, p in cases:
            try:
                if sec == "d":
                    case = section_d(llama, args.rank_d, device, dtype, gen)
                else:
                    case = builders[sec](*(p[k] for k in ("K", "N", "M") + (("r",) if "r" in p else ())), device, dtype, gen)
                row = run_case(case, timer, warmup, repeats, roof, dtype)
                if sec == "d" and on_cuda:
                    row["peak_step_bytes"] = step_peak_memory(case)
                del case
            except Exception as exc:  # a whole case failing (OOM at the largest shape) is recorded, not fatal
                row = {"section": sec, **(p or {}), "contenders": {}, "ratios": {},
                       "errors": {"case": f"{type(exc).__name__}: {exc}"[:500]},
                       "traceback": traceback.format_exc(limit=4)}
            result["rows"].append(row)
            if on_cuda:
                torch.cuda.empty_cache()
        result["elapsed_s"] = time.perf_counter() - t_start
        write(out, result)
    print(f"{result['env']['device']} {result['env'].get('gpu', result['env']['machine'])}, {result['env']['dtype']}, "
          f"torch {torch.__version__}, {result['env']['threads']} thread(s); {timer.kind}; warmup {warmup}, "
          f"{repeats} rounds; {result['elapsed_s']:.0f} s\n")
    if not on_cuda:
        print("Ratios on CPU: paired median of wall-time ratios / of process-CPU-time ratios (steadier when other "
              "processes share the cores).\n")
    print(markdown(result["rows"]))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
