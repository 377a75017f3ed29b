"""Every adapter method side by side on the default job's data, with the same step budget.

The job is `peftcore train`'s default one: the built-in tiny Llama (`peftcore.jobs.builtin`, 1.2M
parameters, cached after its first build) fine-tuned on the bundled Hoshizora Cloud support data
(examples/data/support_train.jsonl: 240 English / Japanese records), scored on the held-out
examples/data/support_eval.jsonl (40 records). Each method runs its own example recipe
(examples/support_*.toml, so its own learning rate, weight decay and adapter settings); QLoRA is
the LoRA recipe with an NF4-quantized base (`[model] quantize = "nf4"`: every linear layer but
lm_head stored as 4-bit NF4 codes plus absmax scales, dequantized in the forward):

    lora      support_lora.toml     LoRA r=8, alpha 32, dropout 0.05, all linear layers, LR 1e-2
    lora-qv   support_lora.toml     + target_modules = q_proj, v_proj (DoRA's targets: the control
                                    that separates "DoRA vs LoRA" from "which layers")
    dora      support_dora.toml     DoRA r=8, alpha 32, dropout 0.05, q_proj + v_proj, LR 1e-2
    qlora     support_lora.toml     + quantize = "nf4" (the same LoRA on a 4-bit base)
    prompt    support_prompt.toml   prompt tuning, 20 virtual tokens (TEXT init), LR 3e-2
    p-tuning  support_ptuning.toml  P-tuning, 20 virtual tokens, MLP encoder (hidden 128), LR 3e-3
    prefix    support_prefix.toml   prefix tuning, 20 virtual keys / values per layer, LR 1e-2
    ia3       support_ia3.toml      (IA)^3 output-scaling vectors on q_proj + v_proj, LR 1e-1
    loha      support_loha.toml     LoHa r=4, alpha 8, q_proj + v_proj, LR 1e-2
    lokr      support_lokr.toml     LoKr r=4, alpha 8, q_proj + v_proj, LR 1e-2
    oft       support_oft.toml      OFT, Cayley-Neumann rotations in blocks of 16, q_proj + v_proj, LR 1e-2
    vera      support_vera.toml     VeRA r=16 (shared random projections), q_proj + v_proj, LR 1e-1
    adalora   support_adalora.toml  AdaLoRA init_r=12 -> target_r=4 (rank budget schedule), q_proj + v_proj,
                                    LR 1e-2 (total_step = --steps; under 60 steps tinit = tfinal = 0)
    qlora-a8  support_lora.toml     QLoRA with lora_alpha = r = 8 (scaling 1): the control for
    qlora-loftq support_qlora_loftq.toml  the same QLoRA, LoftQ-initialised (1 step, NF4)

What every method shares (set with the recipes' own `--set` overrides): the seed (so the same
data order: `batches_from` shuffles with it), the batch size (8), max_length (256), `--steps`
optimizer steps with the recipes' 10 warmup steps and cosine decay to zero at the last step, no
evaluation, checkpoint or early stopping inside the loop, fp32 on the CPU, `--threads` threads.

Each method runs in its own fresh Python process, built with the library's own pieces in the order
`peftcore.jobs.train.run_train` uses them (recipe -> records -> tokens -> base -> `get_peft_model` ->
`peftcore.training.loop.train`), and reports:

  trainable     `get_nb_trainable_parameters()`'s trainable count, and its share of all the
                model's weights (for QLoRA a 4-bit weight counts as one weight, as in its dense
                form and in HF PEFT's count). P-tuning's count includes its MLP encoder, which
                saving drops.
  weights MiB   bytes of every parameter and buffer of the wrapped model (the quantized codes
                and scales included): what the model itself occupies.
  train MiB     the process' resident-memory high-water mark (VmHWM, /proc/self/status) read right
                after the last training step, minus its resident size (VmRSS) after the model was
                loaded and wrapped: what training adds (activations, gradients, AdamW state,
                autograd buffers, allocator slack). The high-water mark is reset (5 written to
                /proc/self/clear_refs) after the "before" evaluation and before training, so
                neither loading nor that evaluation counts; if the kernel refuses the reset the
                figure covers the whole process from load on (`hwm_reset: false` in the JSON).
                What `train` imports lazily (the first AdamW imports torch._dynamo: ~70-140 MiB
                resident) is imported before the baseline is read.
                Read before `train` returns, so its final checkpoint write and loss plot do not count.
  step ms       the median wall time of `peftcore.training.loop.train_step` (forward + backward + clip +
                AdamW: one optimizer update), measured around each call inside `train`, the first
                step (which allocates the optimizer state) skipped as warmup; the median CPU time
                (user + system of the process) too, steadier on a busy machine.
  loss          the held-out token-weighted loss and perplexity (`peftcore.training.loop.evaluate`,
                batch 8) before training, with the adapter disabled (the base model, as
                `peftcore train` reports "before"; the NF4 base for QLoRA), and after the last step.

    python bench/bench_methods.py                     # 12 x 150 steps, 1 thread: ~5 min (2 cores, load ~1)
    python bench/bench_methods.py --quick             # smoke run: 3 steps, 8 held-out records
    python bench/bench_methods.py --methods lora,prompt --steps 150 --threads 2

Prints a markdown table and writes the raw figures as JSON to `--out` (default
bench/results/methods.json) and the table beside it (methods.md). The machine is shared: step
times are indicative, compare them side by side within one run; losses are deterministic.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from proc_memory import reset_peak, status_bytes

RESULTS = Path(__file__).resolve().parent / "results" / "methods.json"
# method -> (example recipe, what changes in it, how the table says so)
METHODS = {
    "lora": ("support_lora.toml", [], ""),
    "lora-qv": ("support_lora.toml", ['adapter.target_modules=["q_proj", "v_proj"]'], " + q, v only"),
    "dora": ("support_dora.toml", [], ""),
    "qlora": ("support_lora.toml", ['model.quantize="nf4"'], " + NF4 base"),
    "prompt": ("support_prompt.toml", [], ""),
    "p-tuning": ("support_ptuning.toml", [], ""),
    "prefix": ("support_prefix.toml", [], ""),
    "ia3": ("support_ia3.toml", [], ""),
    "loha": ("support_loha.toml", [], ""),
    "lokr": ("support_lokr.toml", [], ""),
    "oft": ("support_oft.toml", [], ""),
    "vera": ("support_vera.toml", [], ""),
    "adalora": ("support_adalora.toml", [], ""),
    "qlora-a8": ("support_lora.toml", ['model.quantize="nf4"', "adapter.lora_alpha=8"], " + NF4 base, alpha 8"),
    "qlora-loftq": ("support_qlora_loftq.toml", [], ""),
}
SHORT_SCHEDULE = 60  # fewer steps than this: AdaLoRA's recipe tinit (20) + tfinal (30) leave no budget phase
DEFAULT_STEPS = 150  # the example recipes' own max_steps: their learning rates were chosen for it
QUICK = {"steps": 3, "eval_rows": 8}


# -- the parent: one child per method, then the table --------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help=f"optimizer steps per method (default {DEFAULT_STEPS})")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS))
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each child (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--eval-rows", type=int, default=None,
                        help="score only the first N held-out records (default all)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: {QUICK['steps']} steps, {QUICK['eval_rows']} held-out records (unless given)")
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help="JSON of the raw figures; the table goes beside it (.md)")
    parser.add_argument("--child", choices=list(METHODS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = QUICK["steps"] if args.quick else DEFAULT_STEPS
    if args.eval_rows is None and args.quick:
        args.eval_rows = QUICK["eval_rows"]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if unknown := [m for m in args.methods if m not in METHODS]:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    if args.steps < 1 or args.threads < 1 or args.batch_size < 1:
        parser.error("--steps, --threads and --batch-size must be >= 1")
    return args


def child_command(method: str, args: argparse.Namespace) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", method, "--steps", str(args.steps),
           "--threads", str(args.threads), "--seed", str(args.seed), "--batch-size", str(args.batch_size),
           "--max-length", str(args.max_length)]
    return cmd + (["--eval-rows", str(args.eval_rows)] if args.eval_rows else [])


def run_child(method: str, args: argparse.Namespace) -> dict:
    """One method in a fresh process -> its figures, or {"error": ...} when it failed."""
    out = subprocess.run(child_command(method, args), capture_output=True, text=True, check=False)
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        return {"method": method, "error": (out.stderr or out.stdout).strip()[-2000:] or f"exit {out.returncode}"}
    return json.loads(lines[-1])


def prepare_base() -> str:
    """Build the built-in model once here, so no child pays for (or races on) the first build."""
    import logging

    from peftcore.jobs.builtin import ensure_builtin

    logging.basicConfig(stream=sys.stderr, format="%(message)s")  # the build's progress: stdout holds the results
    logging.getLogger("peftcore").setLevel(logging.INFO)
    return str(ensure_builtin("tiny-llama"))


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            line = next(line for line in f if line.startswith("model name"))
        return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def measure(args: argparse.Namespace) -> dict:
    base = prepare_base()
    load_before, started, when = os.getloadavg(), time.time(), time.strftime("%Y-%m-%d %H:%M %Z")
    results = []
    for method in args.methods:
        print(f"{method} ...", file=sys.stderr, flush=True)
        results.append(run_child(method, args))
    return {"date": when, "torch": torch.__version__, "cpu": cpu_name(),
            "python": platform.python_version(), "base": base, "steps": args.steps, "threads": args.threads,
            "seed": args.seed, "batch_size": args.batch_size, "max_length": args.max_length,
            "eval_rows": args.eval_rows, "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
            "elapsed_s": time.time() - started, "methods": results}


def format_table(res: dict) -> str:
    mib = 2**20
    header = ("| method | recipe | LR | trainable params (share) | weights MiB | train MiB "
              "| step ms, median wall / CPU "
              "| held-out loss before -> after | perplexity before -> after |")
    rows = [header, "|---|---|---|---|---|---|---|---|---|"]
    for r in res["methods"]:
        if "error" in r:
            rows.append(f"| {r['method']} | failed: {r['error'].splitlines()[-1][:120]} |" + " |" * 7)
            continue
        b, a = r["eval_before"], r["eval_after"]
        memory = f"{r['train_bytes'] / mib:.1f}" + ("" if r["hwm_reset"] else " (no reset)")
        rows.append(
            f"| {r['method']} | {r['recipe']}{METHODS[r['method']][2]} | {r['learning_rate']:g} "
            f"| {r['trainable']:,} ({100 * r['trainable'] / r['total']:.2f}%) | {r['weight_bytes'] / mib:.2f} "
            f"| {memory} | {r['step_ms']:.0f} / {r['step_cpu_ms']:.0f} "
            f"| {b['eval_loss']:.3f} -> {a['eval_loss']:.3f} | {b['eval_ppl']:.1f} -> {a['eval_ppl']:.1f} |")
    return "\n".join(rows)


def loads(xs) -> str:
    return "/".join(f"{x:.2f}" for x in xs)


def write_results(res: dict, table: str, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    out.with_suffix(".md").write_text(table + "\n")


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(measure_method(args.child, args)))
        return None
    res = measure(args)
    table = format_table(res)
    write_results(res, table, args.out)
    print(table)
    print(f"\n{args.steps} steps, batch {args.batch_size}, max_length {args.max_length}, seed {args.seed}, "
          f"{args.threads} thread(s); {res['cpu']}; torch {res['torch']}; load average (1/5/15 min) "
          f"{loads(res['loadavg_before'])} before, {loads(res['loadavg_after'])} after; {res['elapsed_s']:.0f} s; "
          f"wrote {args.out} and {args.out.with_suffix('.md')}")
    failed = [r["method"] for r in res["methods"] if "error" in r]
    if failed:
        print(f"FAILED: {', '.join(failed)} (the JSON holds their errors)", file=sys.stderr)
    return res


# -- the child: one method, measured ------------------------------------------------------------
def load_method_recipe(method: str, args: argparse.Namespace):
    """The method's example recipe with the shared settings laid over it (as `--set` would)."""
    from peftcore.jobs.recipe import EXAMPLES_DIR, load_recipe

    name, changes, _ = METHODS[method]
    if method == "adalora" and args.steps < SHORT_SCHEDULE:
        changes = [*changes, "adapter.tinit=0", "adapter.tfinal=0"]
    shared = [f"train.max_steps={args.steps}", f"train.seed={args.seed}", f"train.batch_size={args.batch_size}",
              f"data.max_length={args.max_length}", "train.eval_every=0", "train.checkpoint_every=0",
              "train.patience=0", "train.progress=false", "train.grad_accum=1", f"model.threads={args.threads}",
              'model.device="cpu"', 'model.dtype="float32"']
    return load_recipe(EXAMPLES_DIR / name, [*changes, *shared])


def load_rows(recipe, tokenizer, eval_rows: int | None) -> tuple[list, list]:
    """Train and held-out rows, exactly as `peftcore train` tokenizes them."""
    from peftcore.data.records import pack
    from peftcore.jobs.tasks import parse_records, tokenize_records

    train_records = parse_records(recipe.data.train, recipe.data.template, None, recipe.data.augment)
    eval_records = parse_records(recipe.data.eval, recipe.data.template)[:eval_rows]
    train_rows = tokenize_records(train_records, tokenizer, recipe.data.max_length)
    if recipe.data.packing:
        train_rows = pack(train_rows, recipe.data.max_length)
    return train_rows, tokenize_records(eval_records, tokenizer, recipe.data.max_length)


def import_lazy_modules() -> None:
    """What `train` would otherwise import after the high-water-mark reset: the first AdamW
    imports torch._dynamo (~140 MiB resident, measured), which is not training memory."""
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])


def build_model(recipe, base_folder: Path, device: torch.device):
    """The job's own build (seeded base, the recipe's adapter; LoftQ: dense base, init, then quantize)."""
    from peftcore.jobs.train import build_adapted

    return build_adapted(recipe, base_folder, device, None)


def weight_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


class StepTimer:
    """Times every `peftcore.training.loop.train_step` call that `train` makes, and reads the high-water mark
    after each one. The loop looks `train_step` up in its module when it runs, so swapping the
    module attribute wraps the library's own step; `restore()` puts the original back."""

    def __init__(self):
        import peftcore.training.loop as loop

        self.loop, self.original = loop, loop.train_step
        self.wall, self.cpu, self.losses, self.hwm = [], [], [], 0
        loop.train_step = self.step

    def step(self, *args, **kwargs):
        wall, cpu = time.perf_counter(), time.process_time()
        metrics = self.original(*args, **kwargs)
        self.wall.append(time.perf_counter() - wall)
        self.cpu.append(time.process_time() - cpu)
        self.losses.append(metrics["loss"])
        self.hwm = status_bytes("VmHWM")
        return metrics

    def restore(self) -> None:
        self.loop.train_step = self.original


def measure_method(method: str, args: argparse.Namespace) -> dict:
    """Run in a fresh process: load, evaluate, train `args.steps` steps, evaluate -> the figures."""
    torch.set_num_threads(args.threads)
    from peftcore.jobs.bases import resolve_base, set_runtime
    from peftcore.jobs.tasks import pad_id
    from peftcore.jobs.train import with_schedule_length
    from peftcore.models import load_tokenizer
    from peftcore.training.loop import evaluate, train

    recipe = load_method_recipe(method, args)
    device = set_runtime(recipe.model)
    torch.set_num_threads(args.threads)
    base_folder = resolve_base(recipe.model.base_name)
    tokenizer = load_tokenizer(base_folder)
    pad = pad_id(tokenizer)
    train_rows, eval_rows = load_rows(recipe, tokenizer, args.eval_rows)
    import_lazy_modules()
    after_imports = status_bytes("VmRSS")
    peft_model = build_model(with_schedule_length(recipe, train_rows, 1), base_folder, device)
    after_load = status_bytes("VmRSS")
    trainable, total = peft_model.get_nb_trainable_parameters()  # a 4-bit weight counts as out x in
    batch = recipe.train.batch_size
    with peft_model.disable_adapter():
        before = evaluate(peft_model, eval_rows, batch, pad)
    hwm_reset = reset_peak()
    timer = StepTimer()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            state = train(peft_model, train_rows, [], recipe.train, tmp, pad)
    finally:
        timer.restore()
    if len(timer.wall) != state.step:
        raise RuntimeError(f"timed {len(timer.wall)} train_step calls for {state.step} steps: "
                           "peftcore.training.loop no longer calls train_step once per step")
    after = evaluate(peft_model, eval_rows, batch, pad)
    timed = slice(1, None) if len(timer.wall) > 1 else slice(None)  # the first step allocates AdamW state
    return {
        "method": method, "recipe": METHODS[method][0], "changes": METHODS[method][1],
        "adapter": {"method": recipe.adapter.method, **recipe.adapter.options},
        "learning_rate": recipe.train.learning_rate, "weight_decay": recipe.train.weight_decay,
        "warmup_steps": recipe.train.warmup_steps, "lr_schedule": recipe.train.lr_schedule,
        "quantize": recipe.model.quantize, "device": str(device), "threads": torch.get_num_threads(),
        "steps": state.step, "train_rows": len(train_rows), "eval_rows": len(eval_rows),
        "trainable": trainable, "total": total,
        "weight_bytes": weight_bytes(peft_model),
        "rss_after_imports": after_imports, "rss_after_load": after_load, "hwm_reset": hwm_reset,
        "hwm_after_training": timer.hwm, "train_bytes": timer.hwm - after_load,
        "step_wall_s": timer.wall, "step_cpu_s": timer.cpu, "train_losses": timer.losses,
        "step_ms": 1e3 * statistics.median(timer.wall[timed]), "step_cpu_ms": 1e3 * statistics.median(timer.cpu[timed]),
        "eval_before": before, "eval_after": after,
        "finite": all(math.isfinite(x) for x in [before["eval_loss"], after["eval_loss"], *timer.losses]),
    }


if __name__ == "__main__":
    main()
