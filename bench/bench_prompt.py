"""Prompt methods and LoRA on a tiny Llama: one training step, peftcore against HF PEFT.

What a user would pick instead of peftcore is HF PEFT (`peft.get_peft_model`) on a transformers
model. Both libraries load the SAME saved folder (a random tiny Llama: hidden 256, 4 layers,
4 heads, 2 KV heads, intermediate 688, vocab 8000; ours via `peftcore.models.load_pretrained`,
theirs via `transformers.AutoModelForCausalLM.from_pretrained`) and wrap it with the same config:

  prompt        prompt tuning, 20 virtual tokens (RANDOM init)
  ptuning-mlp   P-tuning, MLP reparameterisation (encoder_hidden_size = hidden)
  ptuning-lstm  P-tuning, 2-layer bidirectional LSTM + MLP
  prefix        prefix tuning, no projection
  prefix-proj   prefix tuning with the tanh-MLP projection
  lora          LoRA r=8, alpha 16, q_proj + v_proj, dropout 0

Every contender starts from the same adapter weights (PEFT's trainable tensors are copied into
ours by name; the names line up), and the initial losses are compared as a check that both
compute the same thing. One step = forward on a fixed batch (default 4 x 128 random tokens, fp32,
CPU, no padding), next-token cross-entropy over the input tokens (the same loss function on both
sides' logits; PEFT's logits for prompt tuning / P-tuning also cover the virtual tokens and are
cut to the input positions first), backward, AdamW step, zero_grad(set_to_none=True).
transformers runs with `use_cache=False` (for prefix tuning PEFT still passes the prefix as
`past_key_values`, which is used).

Step time: all twelve contenders in one process; warmup steps, then timed rounds. A round runs
every contender once: the methods in a freshly shuffled order, and for each method ours and PEFT
back to back, in a random order, so load from other processes on a shared machine hits both
sides of a pair alike. Rounds stop at `--rounds`, or at the first round boundary past `--time-limit`
seconds once `--min-rounds` are done. Reported: the median wall time per step, and ours/PEFT as the
median of the per-round ratios (paired) with their interquartile range (the table; the JSON also
has the same ratio from the process' CPU time, which counts both threads and OpenMP spin-waits).
The load average at start and end goes into the JSON and the printout; a warning says when the
run was too disturbed (fewer than 15 rounds, or per-round ratios spread wide) to trust.

Peak memory: a helper process (started with glibc's mmap threshold fixed at 128 KiB, so every
tensor of any size is its own mapping and goes back to the OS when freed: resident memory follows
the live tensors, not heap kept from earlier steps) imports torch, transformers, peft and
peftcore, then forks one child per contender. The child loads its model, wraps it, makes the
optimizer, runs one step, resets its high-water mark (writes 5 to /proc/self/clear_refs), runs
`--mem-steps` more steps and reports VmHWM minus VmRSS at the reset: the extra resident memory a
steady-state training step needs (activations, logits, gradients, autograd buffers; AdamW state
exists already and is not counted). If the reset is refused, the child falls back to VmHWM over
the whole run minus VmRSS before the model was loaded (`hwm_reset: false` in the JSON).

    python bench/bench_prompt.py                    # 4 x 128, 2 threads: 1.5 min quiet, up to ~7 min busy
    python bench/bench_prompt.py --quick            # smoke run (2 x 64 tokens, 3 rounds): ~45 s on the busy box
    python bench/bench_prompt.py --rounds 40 --time-limit 600 --batch 8 --seq 256

Prints a markdown table and writes bench/results/prompt.json. Absolute CPU times on a shared
machine are noise; the paired ratios are the result.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F
from proc_memory import reset_peak, status_bytes

CONFIG = dict(vocab_size=8000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False)
METHODS = ("prompt", "ptuning-mlp", "ptuning-lstm", "prefix", "prefix-proj", "lora")
LABELS = {"prompt": "prompt tuning", "ptuning-mlp": "P-tuning, MLP", "ptuning-lstm": "P-tuning, LSTM",
          "prefix": "prefix tuning", "prefix-proj": "prefix tuning + projection", "lora": "LoRA r=8 (q, v)"}
RESULTS = Path(__file__).resolve().parent / "results" / "prompt.json"


def save_checkpoint(folder: Path) -> None:
    import transformers

    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).save_pretrained(folder)


def method_config(lib, method: str, n: int):
    """The same adapter config in either library (`lib` is the peftcore or the peft module)."""
    common = dict(task_type="CAUSAL_LM", num_virtual_tokens=n)
    if method == "prompt":
        return lib.PromptTuningConfig(**common)
    if method.startswith("ptuning"):
        return lib.PromptEncoderConfig(**common, encoder_reparameterization_type=method.split("-")[1].upper())
    if method.startswith("prefix"):
        return lib.PrefixTuningConfig(**common, prefix_projection=method == "prefix-proj")
    return lib.LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.0,
                          target_modules=["q_proj", "v_proj"])


class Contender:
    """One wrapped model, its optimizer, and how to get input-position logits out of it."""

    def __init__(self, which: str, method: str, folder: Path, n: int, seed: int):
        self.which, self.method = which, method
        torch.manual_seed(seed)  # the adapter's random init (overwritten for `ours` by copy_adapter)
        if which == "ours":
            import peftcore
            from peftcore.models import load_pretrained

            self.model = peftcore.get_peft_model(load_pretrained(folder), method_config(peftcore, method, n))
        else:
            import peft
            import transformers

            base = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
            self.model = peft.get_peft_model(base, method_config(peft, method, n))
        self.model.train()
        self.n_prompt = n if which == "hf" and method in ("prompt", "ptuning-mlp", "ptuning-lstm") else 0
        self.opt = None

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        return {k: p for k, p in self.model.named_parameters() if p.requires_grad}

    def make_optimizer(self) -> None:
        self.opt = torch.optim.AdamW(list(self.trainable().values()), lr=1e-3)

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        if self.which == "ours":
            return self.model(input_ids=ids)
        return self.model(input_ids=ids, use_cache=False).logits[:, self.n_prompt:]

    def step(self, ids: torch.Tensor) -> float:
        loss = lm_loss(self.logits(ids), ids)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def copy_adapter(src: Contender, dst: Contender) -> None:
    """Give `dst` the adapter weights of `src` (the trainable parameters' names match)."""
    s, d = src.trainable(), dst.trainable()
    if sorted(s) != sorted(d):
        raise RuntimeError(f"{dst.method}: trainable names differ:\n  ours {sorted(d)}\n  hf   {sorted(s)}")
    with torch.no_grad():
        for k, p in d.items():
            p.copy_(s[k])


def make_ids(batch: int, seq: int) -> torch.Tensor:
    return torch.randint(0, CONFIG["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(0))


def timing(folder: Path, args) -> dict:
    ids = make_ids(args.batch, args.seq)
    contenders, check = {}, {}
    for i, method in enumerate(METHODS):
        hf = Contender("hf", method, folder, args.virtual_tokens, seed=i)
        ours = Contender("ours", method, folder, args.virtual_tokens, seed=i)
        copy_adapter(hf, ours)
        with torch.no_grad():
            lo, lh = lm_loss(ours.logits(ids), ids).item(), lm_loss(hf.logits(ids), ids).item()
        check[method] = {"trainable": {"ours": sum(p.numel() for p in ours.trainable().values()),
                                       "hf": sum(p.numel() for p in hf.trainable().values())},
                         "initial_loss": {"ours": lo, "hf": lh}, "abs_loss_diff": abs(lo - lh)}
        for c in (ours, hf):
            c.make_optimizer()
            contenders[(method, c.which)] = c
    for _ in range(args.warmup):
        for c in contenders.values():
            c.step(ids)
    wall = {f"{m}/{w}": [] for m, w in contenders}
    cpu = {k: [] for k in wall}
    rng = random.Random(0)
    order = list(METHODS)
    start = time.perf_counter()
    for round_ in range(args.rounds):
        if round_ >= args.min_rounds and time.perf_counter() - start > args.time_limit:
            break  # a busy machine: stop at a round boundary, every contender has as many samples
        rng.shuffle(order)
        for method in order:  # ours and PEFT back to back (who goes first: a coin), so a pair sees one load
            for which in rng.sample(("ours", "hf"), 2):
                w, c = time.perf_counter(), time.process_time()
                contenders[(method, which)].step(ids)
                wall[f"{method}/{which}"].append(time.perf_counter() - w)
                cpu[f"{method}/{which}"].append(time.process_time() - c)
    out = {}
    for m in METHODS:
        wo, wh, co, ch = wall[f"{m}/ours"], wall[f"{m}/hf"], cpu[f"{m}/ours"], cpu[f"{m}/hf"]
        out[m] = {**check[m], "wall_s": {"ours": wo, "hf": wh}, "cpu_s": {"ours": co, "hf": ch},
                  "median_ms": {"ours": 1e3 * statistics.median(wo), "hf": 1e3 * statistics.median(wh)},
                  "min_ms": {"ours": 1e3 * min(wo), "hf": 1e3 * min(wh)},  # the least-disturbed step
                  "ratio_wall_paired": statistics.median(o / h for o, h in zip(wo, wh)),
                  "ratio_wall_paired_iqr": quartiles([o / h for o, h in zip(wo, wh)]),
                  "ratio_cpu_paired": statistics.median(o / h for o, h in zip(co, ch))}
    return out


def quartiles(xs: list[float]) -> list[float]:
    """[first, third] quartile (the spread of the per-round ratios: how far to trust their median)."""
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return [q[0], q[2]]


def memory_child(which: str, method: str, folder: Path, args) -> dict:
    before_load = status_bytes("VmRSS")
    ids = make_ids(args.batch, args.seq)
    c = Contender(which, method, folder, args.virtual_tokens, seed=0)
    c.make_optimizer()
    c.step(ids)  # AdamW state exists from here on
    reset = reset_peak()
    start = status_bytes("VmRSS") if reset else before_load
    for _ in range(args.mem_steps):
        c.step(ids)
    return {"step_peak": status_bytes("VmHWM") - start, "hwm_reset": reset}


def memory_server(folder: Path, args) -> None:
    """Import everything once, then fork one child per contender; print {key: figures} as JSON."""
    import peft  # noqa: F401
    import transformers  # noqa: F401

    import peftcore.models  # noqa: F401

    result = {}
    for method in METHODS:
        for which in ("ours", "hf"):
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(r)
                try:
                    torch.set_num_threads(args.threads)
                    payload = json.dumps(memory_child(which, method, folder, args))
                except BaseException as e:  # noqa: BLE001
                    payload = json.dumps({"error": repr(e)})
                os.write(w, payload.encode())
                os._exit(0)
            os.close(w)
            with os.fdopen(r) as f:
                data = f.read()
            os.waitpid(pid, 0)
            result[f"{method}/{which}"] = json.loads(data)
    print(json.dumps(result))


def memory(folder: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--memory-server", "--checkpoint", str(folder), "--batch", str(args.batch),
           "--seq", str(args.seq), "--threads", str(args.threads), "--virtual-tokens", str(args.virtual_tokens),
           "--mem-steps", str(args.mem_steps)]
    # A fixed mmap threshold (which also turns off glibc's dynamic one) makes every tensor above
    # 128 KiB its own mapping, handed back to the OS when freed: RSS then follows the live tensors
    # instead of the heap glibc keeps from earlier steps.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"memory helper failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def markdown(res: dict) -> str:
    mib = 2**20
    rows = ["| method | trainable params | ours ms/step | PEFT ms/step | ours/PEFT (paired; IQR) "
            "| ours peak MiB | PEFT peak MiB |", "|---|---|---|---|---|---|---|"]
    for m in METHODS:
        r, mem = res["methods"][m], res["memory"]
        t, iqr = r["trainable"], r["ratio_wall_paired_iqr"]
        params = f"{t['ours']:,}" if t["ours"] == t["hf"] else f"{t['ours']:,} / {t['hf']:,} (!)"
        peak = [mem[f"{m}/{w}"].get("step_peak") for w in ("ours", "hf")]
        peak = [f"{p / mib:.0f}" if p is not None else "-" for p in peak]
        rows.append(f"| {LABELS[m]} | {params} | {r['median_ms']['ours']:.1f} | {r['median_ms']['hf']:.1f} "
                    f"| {r['ratio_wall_paired']:.2f} ({iqr[0]:.2f}-{iqr[1]:.2f}) | {peak[0]} | {peak[1]} |")
    return "\n".join(rows)


def git_state() -> dict:
    """The commit measured, and the library files that differed from it (uncommitted work counts)."""
    root = Path(__file__).resolve().parent.parent
    run = lambda *cmd: subprocess.run(["git", *cmd], cwd=root, capture_output=True, text=True).stdout.rstrip()  # noqa: E731
    return {"commit": run("rev-parse", "HEAD"),
            "dirty": run("status", "--porcelain", "--", "models", "peftcore").splitlines()}


def quiet() -> None:
    """No progress bars or deprecation chatter from transformers / PEFT in the output."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--virtual-tokens", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=30, help="at most this many timed rounds")
    parser.add_argument("--min-rounds", type=int, default=5, help="at least this many, past --time-limit")
    parser.add_argument("--time-limit", type=float, default=150,
                        help="seconds of timed rounds (then stop after --min-rounds)")
    parser.add_argument("--mem-steps", type=int, default=2, help="steps measured per memory child")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 2 x 64 tokens, 1 warmup step, 3 rounds, 1 memory step")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    parser.add_argument("--checkpoint", type=Path, help="reuse a folder saved by an earlier run")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--memory-server", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.batch, args.seq, args.warmup, args.rounds, args.min_rounds, args.mem_steps = 2, 64, 1, 3, 2, 1
        args.time_limit = min(args.time_limit, 10)
    torch.set_num_threads(args.threads)
    quiet()
    if args.memory_server:
        return memory_server(args.checkpoint, args)
    load_before, t0 = os.getloadavg(), time.time()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.checkpoint or Path(tmp)
        if not (folder / "config.json").is_file():
            save_checkpoint(folder)
        mem = {f"{m}/{w}": {} for m in METHODS for w in ("ours", "hf")} if args.no_memory else memory(folder, args)
        methods = timing(folder, args)
    import peft
    import transformers

    res = {
        "date": date.today().isoformat(), "quick": args.quick, "batch": args.batch, "seq": args.seq, "dtype": "float32",
        "threads": torch.get_num_threads(), "virtual_tokens": args.virtual_tokens, "warmup": args.warmup,
        "rounds": len(methods[METHODS[0]]["wall_s"]["ours"]), "mem_steps": args.mem_steps, "config": CONFIG,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
        "machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(), "git": git_state(),
        "loadavg_start": load_before, "loadavg_end": os.getloadavg(), "elapsed_s": time.time() - t0,
        "memory": mem, "methods": methods,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(markdown(res))
    diffs = ", ".join(f"{m} {methods[m]['abs_loss_diff']:.1e}" for m in METHODS)
    print(f"\n|initial loss ours - PEFT|: {diffs}")
    if any(methods[m]["abs_loss_diff"] > 1e-4 for m in METHODS):
        print("WARNING: the two libraries' initial losses differ: they are not computing the same thing")
    spread = statistics.median(r["ratio_wall_paired_iqr"][1] - r["ratio_wall_paired_iqr"][0] for r in methods.values())
    if not args.quick and (res["rounds"] < 15 or spread > 0.6):
        print(f"WARNING: {res['rounds']} rounds, per-round ratios spread over {spread:.2f} (median IQR width): "
              "other processes disturbed this run too much to trust the ratios; rerun when it is quieter")
    print(f"load average (1/5/15 min) at start {'/'.join(f'{x:.2f}' for x in load_before)}, at end "
          f"{'/'.join(f'{x:.2f}' for x in res['loadavg_end'])}; {res['elapsed_s']:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
