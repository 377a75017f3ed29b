"""Command line of the kernel benchmarks: shared flags, the grid, dry run, markdown report, environment, JSON.

`main(argv, sections, name, doc)` is each kernel script's entry point (bench_quant_matmul.py,
bench_lora_matmul.py, bench_qlora.py, and bench_kernels.py with all their sections): it parses the
flags every script shares plus the sections' own, then either enumerates the grid with FLOPs, bytes
and roofline times (`--dry-run`, no tensors) or times every case (kernel_harness.run_case), prints
one markdown table per section and writes JSON (bench/results/NAME.json, or NAME_dryrun.json) after
every section, so a run cut short keeps what it finished.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from kernel_harness import (
    CpuTimer,
    CudaTimer,
    Run,
    Section,
    element_size,
    pick_roofline,
    roofline_seconds,
    run_case,
    step_peak_memory,
)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}
# Shape grids: K = N in `kn`, M in `m`, LoRA rank in `r` (sections with LoRA).
GRIDS = {
    "cuda": dict(kn=[4096, 8192], m=[1, 16, 64, 256, 2048, 8192], r=[16, 64]),
    "cuda_quick": dict(kn=[8192], m=[1, 16, 8192], r=[16]),  # the points the goals name
    "cpu": dict(kn=[1024, 2048], m=[1, 16, 256], r=[16]),
    "cpu_quick": dict(kn=[1024], m=[1, 16, 256], r=[16]),
}


# ---------------------------------------------------------------------------------------------
# Grid and dry run
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


def enumerate_cases(grid: dict, section: Section) -> list[dict]:
    """The section's grid points: K = N, M (and r); one empty point for a section off the grid."""
    if not section.on_grid:
        return [{}]
    return [dict(K=kn, N=kn, M=m) | ({"r": r} if section.lora else {})
            for kn in grid["kn"] for m in grid["m"] for r in (grid["r"] if section.lora else [None])]


def dry_grid_row(section: Section, p: dict, roof: dict | None, dtype: torch.dtype) -> dict:
    """A grid point's row with FLOPs, bytes and roofline times (no tensors, no timing)."""
    row = {"section": section.key, **p, "contenders": {}}
    for name, (flops, nbytes) in section.costs(p, element_size(dtype)).items():
        c = row["contenders"][name] = {"flops": flops, "bytes": nbytes}
        t_roof = roofline_seconds(flops, nbytes, roof, dtype)
        if t_roof is not None:
            c["roofline_ms"] = 1e3 * t_roof
    return row


def dry_run_rows(grid: dict, sections: list[Section], roof: dict | None, run: Run) -> list[dict]:
    """What the CUDA run will fill in: one row per case, grid sections first."""
    rows = [dry_grid_row(s, p, roof, run.dtype) for s in sections if s.on_grid for p in enumerate_cases(grid, s)]
    return rows + [s.dry_row(run) for s in sections if not s.on_grid]


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------
def format_value(v, spec=".1f", missing="—"):
    return missing if v is None else format(v, spec)


def format_cell(row: dict, name: str, key: str, spec=".1f", scale=1.0):
    """A contender's figure; "sig" (or a value under 0.1) in 3 significant digits."""
    v = row["contenders"].get(name, {}).get(key)
    if v is None:
        return "—"
    v *= scale
    return format(v, ".3g") if spec == "sig" or (v and abs(v) < 0.1) else format(v, spec)


def format_us(row: dict, name: str, dry: bool) -> str:
    """A contender's time in us: the roofline time in a dry run, else the median."""
    return format_cell(row, name, "roofline_ms" if dry else "median_ms", ".1f", 1e3)


def format_ratio(row: dict, key: str, spec: str = ".2f") -> str:
    """Paired median of a time ratio; on CPU also the ratio of process CPU times ("wall / cpu")."""
    wall, cpu = row.get("ratios", {}).get(key), row.get("ratios_cpu_time", {}).get(key)
    text = "—" if wall is None else format(wall, spec) + "x"
    return text if cpu is None else f"{text} / {cpu:{spec}}x"


def format_goals(row: dict) -> str:
    gs = row.get("goals") or []
    return "; ".join(f"{'PASS' if g['met'] else ('FAIL' if g['met'] is False else '?')} {g['text']} "
                     f"({format_value(g['value'], '.2f')})" for g in gs)


def lora_table(rows: list[dict], dry: bool, title: str, names: tuple[str, ...], ratio_keys: tuple[str, ...],
               dry_goal: Callable[[dict], str]) -> list[str]:
    """A fwd + bwd LoRA-linear section (K=N, M, r): times of `names` (the last is the base), ratios, goals."""
    parts = [f"### {title}\n"]
    if dry:
        base = names[-1]
        parts.append(f"| K=N | M | r | GFLOP | MB ours | roofline us ours | roofline us {base} | goal | measured |\n|"
                     + "---|" * 9)
        for r in rows:
            c = r["contenders"]
            parts.append(f"| {r['K']} | {r['M']} | {r['r']} | {c['ours']['flops'] / 1e9:.2f} "
                         f"| {c['ours']['bytes'] / 1e6:.1f} | "
                         f"{format_us(r, 'ours', dry)} | {format_us(r, base, dry)} | {dry_goal(r)} | pending |")
    else:
        parts.append("| K=N | M | r | " + " | ".join(f"{n} us" for n in names) + " | ours TFLOP/s | ours % roofline | "
                     + " | ".join(ratio_keys) + " | goals |\n|" + "---|" * (3 + len(names) + 2 + len(ratio_keys) + 1))
        for r in rows:
            parts.append(f"| {r['K']} | {r['M']} | {r['r']} | " + " | ".join(format_us(r, n, dry) for n in names)
                         + f" | {format_cell(r, 'ours', 'tflops', 'sig')} | {format_cell(r, 'ours', 'pct_roofline')} | "
                         + " | ".join(format_ratio(r, k, ".3f") for k in ratio_keys) + f" | {format_goals(r)} |")
    parts.append("")
    return parts


def report_failures(rows: list[dict], dry: bool) -> list[str]:
    """Lines naming the contenders that failed and (after a run) the outcome of the output check."""
    parts = []
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
    return parts


def markdown(rows: list[dict], sections: list[Section], dry: bool = False) -> str:
    """One table per section, in the script's order. Times in us (kernels) or ms (training step)."""
    parts = []
    for s in sections:
        own = [r for r in rows if r["section"] == s.key]
        if own:
            parts += s.table(own, dry)
    return "\n".join(parts + report_failures(rows, dry))


# ---------------------------------------------------------------------------------------------
# Command line, environment, JSON
# ---------------------------------------------------------------------------------------------
def parse_args(argv, sections: list[Section], name: str, description: str) -> argparse.Namespace:
    """The flags every kernel script shares, plus the sections' own (`Section.add_args`)."""
    keys = ",".join(s.key for s in sections)
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cpu")
    p.add_argument("--dtype", default="auto", help="bf16 / fp16 / fp32; auto = bf16 on CUDA, fp32 on CPU")
    p.add_argument("--shapes", help="grid override, e.g. 'kn=4096,8192;m=1,16,64;r=16,64' (keys kn, m, r)")
    if len(sections) > 1:
        p.add_argument("--sections", default=keys, help=f"comma-separated subset of {keys}")
    else:
        p.set_defaults(sections=keys)
    p.add_argument("--quick", action="store_true", help="small grid and few repeats (CPU: < 2 min)")
    p.add_argument("--warmup", type=int, help="untimed calls per contender after the first (default 5 CUDA, 1 CPU)")
    p.add_argument("--repeats", type=int, help="timed rounds (default CUDA 30 / quick 10, CPU 5 / quick 3)")
    for s in sections:
        if s.add_args:
            s.add_args(p)
    p.add_argument("--no-flush-l2", action="store_true", help="CUDA: do not flush L2 before each timed call")
    p.add_argument("--sleep-us", type=float, default=1000.0, help="CUDA: queued sleep before each timed call (0: off)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default on CPU: 1)")
    p.add_argument("--dry-run", action="store_true",
                   help="enumerate the (CUDA) grid with FLOPs / bytes / roofline; no timing")
    p.add_argument("--gpu", default=None, help="device name for --dry-run's roofline (default: this GPU, else H100)")
    default_out = (RESULTS_DIR / f"{name}.json").relative_to(RESULTS_DIR.parents[1])
    p.add_argument("--out", type=Path, default=None, help=f"JSON path (default {default_out})")
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


def select_sections(spec: str, sections: list[Section]) -> list[Section]:
    """--sections "a,b" -> those sections, in the order given."""
    by_key = {s.key: s for s in sections}
    keys = [s for s in spec.replace(" ", "").split(",") if s]
    if bad := [k for k in keys if k not in by_key]:
        raise SystemExit(f"--sections: unknown {bad}; choose from {','.join(by_key)}")
    return [by_key[k] for k in keys]


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


def print_dry_run(run: Run, sections: list[Section], all_sections: list[Section], grid: dict, name: str) -> dict:
    """--dry-run: the grid with FLOPs, bytes and roofline times; prints markdown, writes JSON."""
    gpu = run.args.gpu or (torch.cuda.get_device_name() if torch.cuda.is_available() else "H100")
    roof = pick_roofline(gpu) if run.device.type == "cuda" else None
    rows = dry_run_rows(grid, sections, roof, run)
    result = {"dry_run": True, "env": environment(run.device, run.dtype, "none (dry run)", roof), "grid": grid,
              "rows": rows}
    out = run.args.out or RESULTS_DIR / f"{name}_dryrun.json"
    write(out, result)
    n_cases = sum(len(enumerate_cases(grid, s)) for s in sections if s.on_grid)
    print(f"Dry run: {n_cases} cases on {gpu} figures "
          f"({roof['label'] if roof else 'no roofline'}), {result['env']['dtype']}; no timing.\n")
    print(markdown(rows, all_sections, dry=True))
    print(f"wrote {out}")
    return result


def time_case(section: Section, p: dict, run: Run, timer, warmup: int, repeats: int, roof: dict | None) -> dict:
    """Build and time one case -> its row; a whole case failing (OOM at the largest shape) is recorded, not fatal."""
    try:
        case = section.build(p, run)
        row = run_case(case, timer, warmup, repeats, roof, run.dtype)
        if case.peak_memory and run.device.type == "cuda":
            row["peak_step_bytes"] = step_peak_memory(case)
    except Exception as exc:
        row = {"section": section.key, **p, "contenders": {}, "ratios": {},
               "errors": {"case": f"{type(exc).__name__}: {exc}"[:500]},
               "traceback": traceback.format_exc(limit=4)}
    return row


def time_sections(run: Run, argv, sections: list[Section], all_sections: list[Section], grid: dict, name: str) -> dict:
    """Time every case of the sections; prints markdown, writes JSON after each section."""
    args, device, dtype = run.args, run.device, run.dtype
    on_cuda = device.type == "cuda"
    if on_cuda:
        device = run.device = torch.device(
            "cuda", torch.cuda.current_device() if device.index is None else device.index)
        torch.cuda.set_device(device)
    roof = pick_roofline(torch.cuda.get_device_name()) if on_cuda else None
    timer = CudaTimer(not args.no_flush_l2, args.sleep_us) if on_cuda else CpuTimer()
    warmup = args.warmup if args.warmup is not None else (5 if on_cuda else 1)
    repeats = args.repeats or ((10 if args.quick else 30) if on_cuda else (3 if args.quick else 5))
    out = args.out or RESULTS_DIR / f"{name}.json"
    result = {"dry_run": False, "env": environment(device, dtype, timer.kind, roof), "grid": grid, **run.config,
              "warmup": warmup, "repeats": repeats, "argv": sys.argv[1:] if argv is None else list(argv), "rows": []}
    run.gen = torch.Generator(device=device).manual_seed(args.seed)
    t_start = time.perf_counter()
    for s in sections:
        for p in enumerate_cases(grid, s):
            result["rows"].append(time_case(s, p, run, timer, warmup, repeats, roof))
            if on_cuda:
                torch.cuda.empty_cache()
        result["elapsed_s"] = time.perf_counter() - t_start
        write(out, result)
    env = result["env"]
    print(f"{env['device']} {env.get('gpu', env['machine'])}, {env['dtype']}, torch {torch.__version__}, "
          f"{env['threads']} thread(s); {timer.kind}; warmup {warmup}, {repeats} rounds; {result['elapsed_s']:.0f} s\n")
    if not on_cuda:
        print("Ratios on CPU: paired median of wall-time ratios / of process-CPU-time ratios (steadier when other "
              "processes share the cores).\n")
    print(markdown(result["rows"], all_sections))
    print(f"wrote {out}")
    return result


def main(argv, sections: list[Section], name: str, doc: str) -> dict:
    """A kernel script's entry point: its sections, its JSON name (results/NAME.json), its docstring."""
    args = parse_args(argv, sections, name, doc.splitlines()[0])
    device, dtype = resolve(args)
    if args.threads or device.type == "cpu":
        # CPU default 1 thread: on a shared 2-core box two threads wait on each other (measured:
        # a 16 x 1024 x 1024 fp32 matmul took 0.5 ms on one thread, 32 ms on two under load)
        torch.set_num_threads(args.threads or 1)
    chosen = select_sections(args.sections, sections)
    grid = parse_shapes(args.shapes,
                        GRIDS[("cuda" if device.type == "cuda" else "cpu") + ("_quick" if args.quick else "")])
    config = {}
    for s in sections:
        if s.configure:
            config.update(s.configure(args, device))
    run = Run(args, device, dtype, config)
    if args.dry_run:
        return print_dry_run(run, chosen, sections, grid, name)
    return time_sections(run, argv, chosen, sections, grid, name)
