"""Low-rank inspection vs the dense SVD of dW = s * B @ A: time and peak memory, side by side.

    python bench/bench_inspect.py                 # 4096 x 4096, r = 16 (the issue's shape)
    python bench/bench_inspect.py --size 1024     # quicker

Each path runs in its own subprocess so its peak resident memory (VmHWM, above the RSS right
before the call) is its own. The dense path is what a user writes by hand: materialise dW, then
torch.linalg.svdvals (singular values only: the cheapest dense variant).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = """
import json, sys, time, torch
from peftcore.analysis.lowrank import lowrank_svd, subspace_similarity
torch.set_num_threads(int(sys.argv[4]))
size, r, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
g = torch.Generator().manual_seed(0)
B, A = torch.randn(size, r, generator=g), torch.randn(r, size, generator=g)

def status(field):
    return int(next(l for l in open("/proc/self/status") if l.startswith(field + ":")).split()[1]) * 1024

def run():
    if path == "lowrank":
        return lowrank_svd(B, A, 2.0).S[:r]
    return torch.linalg.svdvals(2.0 * B @ A)[:r]

run()  # warm up (allocator, BLAS threads)
before = status("VmRSS")
times = []
for _ in range(int(sys.argv[5])):
    start = time.perf_counter()
    S = run()
    times.append(time.perf_counter() - start)
print(json.dumps({"seconds": sorted(times)[len(times) // 2], "peak_growth_bytes": status("VmHWM") - before,
                  "sigma": [float(v) for v in S[:3]]}))
"""


def measure(path: str, size: int, r: int, threads: int, repeats: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(size), str(r), path, str(threads), str(repeats)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default="bench/results/inspect.json")
    args = parser.parse_args(argv)
    low = measure("lowrank", args.size, args.rank, args.threads, args.repeats)
    dense = measure("dense", args.size, args.rank, args.threads, max(1, args.repeats // 3))
    dense_matrix = args.size * args.size * 4  # one fp32 out x in dW
    result = {"size": args.size, "rank": args.rank, "lowrank": low, "dense": dense,
              "speedup": dense["seconds"] / low["seconds"], "dense_matrix_bytes": dense_matrix,
              "same_sigma": all(abs(a - b) <= 1e-3 * abs(b) for a, b in zip(low["sigma"], dense["sigma"]))}
    print(f"| path | time | peak memory growth |\n| --- | --- | --- |\n"
          f"| low rank (QR + {args.rank}x{args.rank} SVD) | {low['seconds'] * 1e3:.2f} ms "
          f"| {low['peak_growth_bytes'] / 2**20:.1f} MiB |\n"
          f"| dense svdvals({args.size}x{args.size}) | {dense['seconds'] * 1e3:.0f} ms "
          f"| {dense['peak_growth_bytes'] / 2**20:.1f} MiB |\n"
          f"speedup {result['speedup']:.0f}x; one dense dW is {dense_matrix / 2**20:.0f} MiB; "
          f"top singular values agree: {result['same_sigma']}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
