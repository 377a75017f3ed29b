"""QLoRA: the NF4 + LoRA linear forward + backward, and a 7B-shaped QLoRA training step, vs bitsandbytes + PEFT.

Sections c and d of bench_kernels.py (`--sections`, default both):
  c  QLoRA linear forward + backward (x, A, B require grad; W frozen in NF4): ours (quant_matmul with
     a LoraTerm) vs bitsandbytes + PEFT-style unfused LoRA (bnb.matmul_4bit + (x A^T) B^T * s) vs
     the torch reference vs the dense base linear alone (fwd + dX, the floor a dense model would pay).
  d  QLoRA training step (forward, cross-entropy, backward; no optimizer) of a tiny-depth Llama
     with 7B-shaped layers (hidden 4096, intermediate 11008, 32 heads; vocab cut to 1024 so the
     7 linears dominate), NF4 base + LoRA r=16 on all 7 linears: ours
     (peftcore.get_peft_model over load_pretrained(quantize="nf4")) vs transformers
     (BitsAndBytesConfig load_in_4bit, nf4, no double quant) + HF PEFT, from one checkpoint; both
     keep the adapters in the compute dtype, neither upcasts norms (no prepare_model_for_kbit_training).
     On CPU a toy shape (hidden 256); `--llama` overrides the shape, `--rank-d` the rank.
Timing and derived figures: kernel_harness.py.

    python bench/bench_qlora.py --device cpu --quick                   # CPU, < 1 min
    python bench/bench_qlora.py --sections d --llama batch=2,seq=1024  # CUDA: the training step only
    python bench/bench_qlora.py --dry-run --gpu H100                   # grid, FLOPs, bytes, no timing

Prints markdown tables and writes JSON (default bench/results/qlora.json).
"""
from __future__ import annotations

import tempfile

import torch
import torch.nn.functional as F
from kernel_cli import format_ratio, format_value, lora_table
from kernel_cli import main as run_main
from kernel_harness import (
    Case,
    Contender,
    Run,
    Section,
    bnb_nf4,
    element_size,
    fwd_bwd_cost,
    grad_step,
    lora_operands,
    raiser,
    triton_path,
    weight_bytes,
)

SCALE = 2.0  # LoRA scaling s of section c
LLAMA_7B_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Section d: one Llama-7B decoder layer (vocab cut so the lm_head does not dominate), and a CPU toy.
LLAMA = {
    "cuda": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                 num_hidden_layers=1, vocab_size=1024, batch=1, seq=2048),
    # intermediate a multiple of 64: bitsandbytes 0.50.2's CPU dequantize_4bit is wrong when a 64-block
    # straddles two rows (K = 688: max error 5x the NF4 rounding error), and the check would flag it
    "cpu": dict(hidden_size=256, intermediate_size=704, num_attention_heads=4, num_key_value_heads=4,
                num_hidden_layers=1, vocab_size=256, batch=2, seq=64),
}
HF_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers",
           "vocab_size")


# ---------------------------------------------------------------------------------------------
# c. QLoRA linear
# ---------------------------------------------------------------------------------------------
def layer_costs(p: dict, e: int) -> dict:
    """(FLOPs, bytes) of forward + backward: NF4 base + LoRA (ours; bnb and ref alike), and the dense base alone."""
    M, K, N, r = p["M"], p["K"], p["N"], p["r"]
    return {"ours": fwd_bwd_cost(M, K, N, r, "nf4", e), "dense_base": fwd_bwd_cost(M, K, N, 0, "dense", e)}


def build_layer_case(p: dict, run: Run) -> Case:
    from peftcore.kernels import quant
    from peftcore.kernels.quant_matmul import LoraTerm, quant_matmul, quant_matmul_reference

    K, N, M, r, s = p["K"], p["N"], p["M"], p["r"], SCALE
    costs = layer_costs(p, element_size(run.dtype))
    cost = costs["ours"]
    W, x, A, B, g = lora_operands(K, N, M, r, run.gen, run.dtype)
    nf4 = quant.nf4_quantize(W)
    leaves = [x, A, B]
    cs = [Contender("ours", grad_step(lambda: quant_matmul(x, nf4, lora=LoraTerm(A, B, s)), g, leaves), *cost,
                    note="quant_matmul + LoraTerm: " + ("Triton kernels" if triton_path(x) else "torch path")),
          Contender("ref", grad_step(lambda: quant_matmul_reference(x, nf4, lora=LoraTerm(A, B, s)), g, leaves), *cost,
                    check=None),
          Contender("dense_base", grad_step(lambda: F.linear(x, W), g, [x]), *costs["dense_base"],
                    note="dense base linear alone, fwd + dX", check=None)]
    try:
        bnb, packed, state = bnb_nf4(W)
        qt = packed.t()
        cs.append(Contender("bnb_peft", grad_step(
            lambda: bnb[0].matmul_4bit(x, qt, quant_state=state) + F.linear(F.linear(x, A), B) * s, g, leaves), *cost,
            note="bnb.matmul_4bit + PEFT-style unfused LoRA"))
    except Exception as exc:
        cs.append(Contender("bnb_peft", raiser(exc), *cost))
    ratios = [("bnb_peft/ours", "bnb_peft", "ours"), ("ref/ours", "ref", "ours"),
              ("ours/dense_base", "ours", "dense_base")]
    return Case("c", dict(K=K, N=N, M=M, r=r), cs, ratios=ratios)


def format_layer_table(rows: list[dict], dry: bool) -> list[str]:
    return lora_table(rows, dry, "c. QLoRA linear (NF4 base + LoRA) forward + backward; ratios = time ratios",
                      ("ours", "bnb_peft", "ref", "dense_base"), ("bnb_peft/ours", "ref/ours", "ours/dense_base"),
                      lambda row: "")


# ---------------------------------------------------------------------------------------------
# d. QLoRA training step
# ---------------------------------------------------------------------------------------------
def add_step_args(p) -> None:
    p.add_argument("--rank-d", type=int, default=16, help="LoRA rank of section d")
    p.add_argument("--llama", help="section d override, e.g. 'batch=2,seq=1024,num_hidden_layers=2'")


def llama_config(device: torch.device, override: str | None) -> dict:
    cfg = dict(LLAMA["cuda" if device.type == "cuda" else "cpu"])
    for part in (override or "").replace(" ", "").split(","):
        if part:
            k, _, v = part.partition("=")
            if k not in cfg:
                raise SystemExit(f"--llama: unknown key {k!r}; keys: {', '.join(cfg)}")
            cfg[k] = int(v)
    return cfg


def configure_step(args, device: torch.device) -> dict:
    return {"llama": llama_config(device, args.llama)}


def llama_cost(cfg: dict, r: int) -> dict:
    """Approximate FLOPs of one step (forward + backward, frozen base): linears, LoRA, attention, lm_head."""
    d, i, L, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    kv = d // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    T = cfg["batch"] * cfg["seq"]
    shapes = [(d, d), (d, kv), (d, kv), (d, d), (d, i), (d, i), (i, d)]  # (in, out) of the 7 linears
    params = sum(k * n for k, n in shapes)
    linear = L * 4.0 * T * params  # forward + dX (no dW: frozen)
    lora = L * 6.0 * T * r * sum(k + n for k, n in shapes)
    # QK^T and PV forward, twice that backward (no causal saving)
    attn = L * 3 * 4.0 * cfg["batch"] * cfg["seq"] ** 2 * d
    head = 4.0 * T * d * V
    return {"tokens": T, "linear_params_per_layer": params, "flops": linear + lora + attn + head,
            "flops_linear": linear, "flops_lora": lora, "flops_attention": attn, "flops_lm_head": head,
            "nf4_bytes": L * sum(weight_bytes("nf4", n, k, 2) for k, n in shapes)}


def dry_step_row(run: Run) -> dict:
    llama, r = run.config["llama"], run.args.rank_d
    return {"section": "d", **llama, "r": r, "cost": llama_cost(llama, r), "contenders": {}}


def load_models(cfg: dict, r: int, device: torch.device, dtype: torch.dtype):
    """(ours, hf): both loaded from one saved random checkpoint, NF4 base + LoRA r on the 7 linears, train mode."""
    import peft
    import transformers

    import peftcore
    from peftcore.models import load_pretrained

    hf_config = transformers.LlamaConfig(**{k: cfg[k] for k in HF_KEYS}, max_position_embeddings=max(2048, cfg["seq"]))
    lora_kw = dict(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=list(LLAMA_7B_LINEARS))
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        dense = transformers.LlamaForCausalLM(hf_config)  # on CPU: ~0.8 GB fp32 at the 7B layer shape
        dense.to(dtype).save_pretrained(folder)
        del dense
        ours = load_pretrained(folder, dtype=dtype, device=device, quantize="nf4")
        ours = peftcore.get_peft_model(ours, peftcore.LoraConfig(**lora_kw), autocast_adapter_dtype=False).train()
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
        # adapters kept in the compute dtype on both sides (both libraries' default autocast_adapter_dtype=True
        # holds bf16 adapters in fp32, a dtype choice rather than an implementation difference).
        hf = peft.get_peft_model(hf, peft.LoraConfig(**lora_kw), autocast_adapter_dtype=False).train()
    return ours, hf


def train_step(model, forward, labels: torch.Tensor, T: int, V: int):
    """One forward, cross-entropy, backward, gradients dropped after; returns the logits."""
    params = [p for p in model.parameters() if p.requires_grad]

    def fn():
        logits = forward()
        F.cross_entropy(logits.float().view(T, V), labels).backward()
        for p in params:
            p.grad = None
        return logits
    return fn


def build_step_case(p: dict, run: Run) -> Case:
    """Ours vs transformers + bitsandbytes + HF PEFT, both loaded from one saved random checkpoint."""
    from peftcore.lora.layer import LoraLinear

    cfg, r, device, dtype, gen = run.config["llama"], run.args.rank_d, run.device, run.dtype, run.gen
    ours, hf = load_models(cfg, r, device, dtype)
    V, T = cfg["vocab_size"], cfg["batch"] * cfg["seq"]
    ids = torch.randint(0, V, (cfg["batch"], cfg["seq"]), generator=gen, device=gen.device)
    labels = ids.view(-1)
    cost = llama_cost(cfg, r)
    probe = torch.empty(1, cfg["hidden_size"], dtype=dtype, device=device)
    lora_layers = [m for m in ours.modules() if isinstance(m, LoraLinear)]
    hf_4bit = sum(type(m).__module__.startswith("bitsandbytes") and type(m).__name__ == "Linear4bit"
                  for m in hf.modules())
    params = dict(**{k: cfg[k] for k in HF_KEYS}, batch=cfg["batch"], seq=cfg["seq"], r=r, tokens=T,
                  ours_lora_layers=len(lora_layers),
                  ours_fused_layers=sum(m.can_fuse(probe, None) for m in lora_layers),
                  hf_linear4bit_layers=hf_4bit, cost=cost,
                  lora_dtypes={name: str(next(p for n, p in m.named_parameters() if "lora_A" in n).dtype)
                               for name, m in (("ours", ours), ("hf", hf))})
    # LoRA B starts at zero on both sides, and both quantize to the same NF4 codes: equal logits
    cs = [Contender("ours", train_step(ours, lambda: ours(ids), labels, T, V), cost["flops"], cost["nf4_bytes"],
                    note="peftcore.get_peft_model(load_pretrained(quantize='nf4'))", check="hf_peft_bnb"),
          Contender("hf_peft_bnb", train_step(hf, lambda: hf(input_ids=ids, use_cache=False).logits, labels, T, V),
                    cost["flops"], cost["nf4_bytes"], note="transformers BitsAndBytesConfig(load_in_4bit) + HF PEFT",
                    check=None)]
    return Case("d", params, cs, ratios=[("hf/ours", "hf_peft_bnb", "ours")], peak_memory=True)


def describe_shape(r: dict) -> str:
    return (f"hidden {r['hidden_size']}, intermediate {r['intermediate_size']}, {r['num_attention_heads']} heads, "
            f"{r['num_hidden_layers']} layer(s), vocab {r['vocab_size']}, "
            f"batch {r['batch']} x seq {r['seq']}, r={r['r']}")


def format_step_table(rows: list[dict], dry: bool) -> list[str]:
    parts = ["### d. QLoRA training step (forward + CE + backward), Llama-7B-shaped layers, NF4 + LoRA on 7 linears\n"]
    for r in rows:
        if "cost" not in r:  # the case failed before it had a model: the failure is listed below the tables
            continue
        shape, cost = describe_shape(r), r["cost"]
        if dry:
            parts.append(f"{shape}: {cost['tokens']} tokens, ~{cost['flops'] / 1e12:.2f} TFLOP per step "
                         f"(linears {cost['flops_linear'] / 1e12:.2f}, "
                         f"attention {cost['flops_attention'] / 1e12:.2f}), "
                         f"NF4 weights {cost['nf4_bytes'] / 1e6:.0f} MB: pending")
            continue
        parts.append(f"{shape}; LoRA layers fused: {r.get('ours_fused_layers')} / {r.get('ours_lora_layers')} (ours), "
                     f"bnb Linear4bit layers: {r.get('hf_linear4bit_layers')} (HF)\n")
        parts.append("| contender | step ms | tokens/s | TFLOP/s (approx.) | peak step MiB | hf/ours |\n"
                     "|---|---|---|---|---|---|")
        for n in ("ours", "hf_peft_bnb"):
            c = r["contenders"].get(n)
            if c is None:
                parts.append(f"| {n} | error: {r['errors'].get(n, '?')} | | | | |")
                continue
            mem = r.get("peak_step_bytes", {}).get(n)
            parts.append(f"| {n} | {c['median_ms']:.1f} | {cost['tokens'] / c['median_ms'] * 1e3:.0f} "
                         f"| {c['tflops']:.3g} | "
                         f"{format_value(None if mem is None else mem / 2**20, '.0f')} | "
                         f"{format_ratio(r, 'hf/ours', '.3f') if n == 'ours' else ''} |")
    parts.append("")
    return parts


LAYER = Section("c", build=build_layer_case, table=format_layer_table, costs=layer_costs, lora=True)
STEP = Section("d", build=build_step_case, table=format_step_table, dry_row=dry_step_row, add_args=add_step_args,
               configure=configure_step)


def main(argv=None) -> dict:
    return run_main(argv, [LAYER, STEP], "qlora", __doc__)


if __name__ == "__main__":
    main()
