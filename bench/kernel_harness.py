"""Measuring harness of the kernel benchmarks: cases, timers, output checks, derived figures, goals.

Used by one script per kernel (bench_quant_matmul.py, bench_lora_matmul.py, bench_qlora.py; run
alone or all together by bench_kernels.py). A script describes each of its sections (one table of
the report) as a `Section`: how to build a case (`Case`: the contenders timed together, their time
ratios and goals), the FLOPs and bytes of its contenders (what `--dry-run` prints), and its markdown
table; kernel_cli.main does the rest (flags, grid, dry run, markdown, JSON).

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
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

GROUP_SIZE = 128  # int4 group size

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
# Output agreement (max |a - b| / max |b|) every checked contender must reach: fp32 dots are tf32 on
# NVIDIA GPUs (~1e-3); 16-bit outputs round to 8 / 11 bits and accumulate in another order.
CHECK_TOL = {torch.float32: 2e-3, torch.float16: 2e-2, torch.bfloat16: 4e-2}


# ---------------------------------------------------------------------------------------------
# Rooflines and cost models (also what --dry-run prints)
# ---------------------------------------------------------------------------------------------
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


def roofline_seconds(flops: float, nbytes: float, roof: dict | None, dtype: torch.dtype) -> float | None:
    """The least time the device's peak FLOP/s and HBM bandwidth allow, or None without a roofline."""
    peak = peak_tflops(roof, dtype)
    if roof is None or not peak:
        return None
    return max(flops / (peak * 1e12), nbytes / (roof["hbm_tbps"] * 1e12))


def element_size(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


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


# ---------------------------------------------------------------------------------------------
# Cases, sections, timers
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
    goals: list[dict] = field(default_factory=list)  # see evaluate_goal
    peak_memory: bool = False  # CUDA: also record each contender's peak memory during one call


@dataclass
class Run:
    """What a section's builders see: the flags, device, dtype, the sections' config, the generator."""
    args: argparse.Namespace
    device: torch.device
    dtype: torch.dtype
    config: dict  # extra JSON keys from the sections' `configure` (section d: {"llama": ...})
    gen: torch.Generator | None = None  # None in a dry run


@dataclass
class Section:
    """One section of the report (a kernel's table). Grid sections have one case per (K=N, M[, r]) of the grid."""
    key: str
    build: Callable[[dict, Run], Case]  # (the grid point, or {}) -> the case
    table: Callable[[list[dict], bool], list[str]]  # (its rows, dry run) -> markdown lines
    costs: Callable[[dict, int], dict] | None = None  # (grid point, element size) -> {contender: (FLOPs, bytes)}
    lora: bool = False  # the grid runs over the LoRA rank too
    dry_row: Callable[[Run], dict] | None = None  # a section off the grid: its one dry-run row
    add_args: Callable[[argparse.ArgumentParser], None] | None = None
    configure: Callable[[argparse.Namespace, torch.device], dict] | None = None

    @property
    def on_grid(self) -> bool:
        return self.dry_row is None


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


# ---------------------------------------------------------------------------------------------
# Running a case
# ---------------------------------------------------------------------------------------------
def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def metrics(seconds: float, flops: float, nbytes: float, roof: dict | None, dtype: torch.dtype) -> dict:
    out = {"median_ms": seconds * 1e3, "tflops": flops / seconds / 1e12, "gbps": nbytes / seconds / 1e9,
           "flops": flops, "bytes": nbytes}
    t_roof = roofline_seconds(flops, nbytes, roof, dtype)
    if t_roof is not None:
        peak = peak_tflops(roof, dtype)
        out.update(pct_hbm=100 * out["gbps"] / (roof["hbm_tbps"] * 1e3), pct_flops=100 * out["tflops"] / peak,
                   roofline_ms=t_roof * 1e3, pct_roofline=100 * t_roof / seconds)
    return out


def warm_up(contenders: list[Contender], warmup: int, errors: dict) -> tuple[dict, list[Contender]]:
    """First call of each contender (autotuning, compilation, the check output), then `warmup` more.

    -> ({name: first output}, the contenders that ran); a failure goes to `errors` and drops the contender."""
    outputs, live = {}, []
    for c in contenders:
        try:
            outputs[c.name] = c.fn().detach().clone()
            for _ in range(warmup):
                c.fn()
            live.append(c)
        except Exception as exc:  # one contender failing (bnb without a GPU build, OOM) must not end the run
            errors[c.name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return outputs, live


def check_outputs(contenders: list[Contender], outputs: dict, row: dict, tol: float) -> None:
    """Each checked contender's max relative error against its reference, into the row."""
    row["check_tol"], row["check_failed"] = tol, []
    for c in contenders:
        if c.check and c.name in outputs and c.check in outputs:
            err = row["check_max_rel_err"][c.name] = max_rel_err(outputs[c.name], outputs[c.check])
            if not err <= tol:
                row["check_failed"].append(f"{c.name} vs {c.check}: {err:.1e}")


def time_rounds(live: list[Contender], timer, repeats: int) -> tuple[dict, dict]:
    """`repeats` rounds in rotated order -> ({name: seconds per round}, {name: process CPU seconds (CPU timer)})."""
    times = {c.name: [] for c in live}
    cpu = {c.name: [] for c in live}  # CPU timer only: process CPU seconds, steadier on a busy machine
    for i in range(repeats):
        order = live[i % len(live):] + live[: i % len(live)] if live else []
        for c, t in zip(order, timer.round([c.fn for c in order])):
            times[c.name].append(t)
        for c, t in zip(order, getattr(timer, "cpu_times", [])):
            cpu[c.name].append(t)
    return times, cpu


def paired_ratios(ratios: list[tuple[str, str, str]], times: dict) -> dict:
    """{label: median over rounds of numerator time / denominator time} where both ran."""
    return {label: statistics.median(a / b for a, b in zip(times[num], times[den]))
            for label, num, den in ratios if num in times and den in times and times[num] and all(times[den])}


def run_case(case: Case, timer, warmup: int, repeats: int, roof: dict | None, dtype: torch.dtype) -> dict:
    """Check, warm up, then `repeats` rotated rounds; -> the case's JSON row."""
    row = {"section": case.section, **case.params, "contenders": {}, "errors": {}, "check_max_rel_err": {}}
    outputs, live = warm_up(case.contenders, warmup, row["errors"])
    check_outputs(case.contenders, outputs, row, CHECK_TOL[dtype])
    del outputs
    times, cpu = time_rounds(live, timer, repeats)
    for c in live:
        row["contenders"][c.name] = dict(metrics(statistics.median(times[c.name]), c.flops, c.bytes, roof, dtype),
                                         times_ms=[t * 1e3 for t in times[c.name]], note=c.note)
        if cpu[c.name]:
            row["contenders"][c.name]["median_cpu_ms"] = statistics.median(cpu[c.name]) * 1e3
    row["ratios"] = paired_ratios(case.ratios, times)
    row["ratios_cpu_time"] = paired_ratios(case.ratios, cpu)
    row["goals"] = [evaluate_goal(g, row) for g in case.goals]
    return row


def evaluate_goal(goal: dict, row: dict) -> dict:
    """goal: {"text", "metric": ("ratio", label) or ("pct_hbm", contender), "op": ">=" or "<=", "target"}."""
    kind, key = goal["metric"]
    value = row["ratios"].get(key) if kind == "ratio" else row["contenders"].get(key, {}).get(kind)
    ok = None if value is None else (value >= goal["target"] if goal["op"] == ">=" else value <= goal["target"])
    return {"text": goal["text"], "value": value, "target": goal["target"], "op": goal["op"], "met": ok}


def step_peak_memory(case: Case) -> dict:
    """CUDA: peak allocated bytes during one call of each contender, above what was allocated before it."""
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
# Operands and contenders shared by the sections
# ---------------------------------------------------------------------------------------------
def randn(shape: tuple, gen: torch.Generator, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """Normal values drawn on the generator's device (a 8192 x 8192 draw on CPU would take ~0.5 s)."""
    t = torch.randn(shape, generator=gen, device=gen.device)
    return (t.mul_(scale) if scale != 1.0 else t).to(dtype)


def lora_operands(K: int, N: int, M: int, r: int, gen: torch.Generator, dtype: torch.dtype):
    """W (N, K) frozen; x (M, K), A (r, K), B (N, r) requiring grad; the output gradient g (M, N)."""
    W = randn((N, K), gen, dtype, 0.02)
    x = randn((M, K), gen, dtype).requires_grad_(True)
    A = randn((r, K), gen, dtype, 1 / math.sqrt(K)).requires_grad_(True)
    B = randn((N, r), gen, dtype, 0.02).requires_grad_(True)
    g = randn((M, N), gen, dtype)
    return W, x, A, B, g


def grad_step(forward: Callable[[], torch.Tensor], g: torch.Tensor, leaves: list[torch.Tensor]):
    """One forward + backward(g), gradients dropped after; returns the output."""
    def fn():
        y = forward()
        y.backward(g)
        for t in leaves:
            t.grad = None
        return y
    return fn


def raiser(exc: Exception):
    """A contender that fails with `exc` (recorded in the row's errors)."""
    def fn():
        raise exc
    return fn


def triton_path(x: torch.Tensor) -> bool:
    """Whether peftcore's kernels take Triton for x (CUDA, or CPU under TRITON_INTERPRET=1)."""
    from peftcore.kernels import dispatch

    return dispatch.use_triton(x)


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
