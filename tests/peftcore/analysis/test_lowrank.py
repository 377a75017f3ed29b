import copy
import json

import peft
import pytest
import torch
import transformers
from hypothesis import given
from hypothesis import strategies as st

from peftcore.analysis.lowrank import (
    amplification_factor,
    compare_adapters,
    effective_rank,
    format_table,
    inspect_adapter,
    lowrank_svd,
    stable_rank,
    subspace_similarity,
    write_json,
)


@given(out=st.integers(2, 24), inp=st.integers(2, 24), r=st.integers(1, 8), scale=st.floats(0.1, 4.0),
       seed=st.integers(0, 99))
def test_lowrank_singular_values_equal_the_dense_svd(out, inp, r, scale, seed):
    g = torch.Generator().manual_seed(seed)
    B, A = torch.randn(out, r, generator=g, dtype=torch.float64), torch.randn(r, inp, generator=g, dtype=torch.float64)
    svd = lowrank_svd(B, A, scale)
    dense = torch.linalg.svdvals(scale * B @ A)
    k = min(r, out, inp)
    torch.testing.assert_close(svd.S[:k], dense[:k], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(svd.U @ torch.diag(svd.S) @ svd.V.T, scale * B @ A, rtol=1e-9, atol=1e-9)


def test_amplification_factor_equals_the_dense_computation():
    torch.manual_seed(0)
    W, B, A = (torch.randn(40, 30, dtype=torch.float64), torch.randn(40, 4, dtype=torch.float64),
               torch.randn(4, 30, dtype=torch.float64))
    dW = 2.0 * B @ A
    U, S, Vh = torch.linalg.svd(dW)
    dense = torch.linalg.norm(dW) / torch.linalg.norm(U[:, :4].T @ W @ Vh[:4].T)
    assert amplification_factor(lowrank_svd(B, A, 2.0), W) == pytest.approx(float(dense), rel=1e-9)


def test_phi_of_an_adapter_with_itself_is_one():
    A = torch.randn(6, 50)
    phi = subspace_similarity(A, A)
    torch.testing.assert_close(phi.diagonal(), torch.ones(6, dtype=phi.dtype), rtol=1e-9, atol=1e-9)
    assert (phi <= 1 + 1e-9).all() and (phi >= 0).all()


def test_phi_of_independent_random_subspaces_matches_its_expectation():
    """E ||U1_i^T U2_j||_F^2 = i*j/d for independent uniformly random subspaces, so phi ~ i*j / (d * min(i, j))."""
    d, r, trials = 64, 8, 200
    torch.manual_seed(1)
    mean = sum(subspace_similarity(torch.randn(r, d), torch.randn(r, d)) for _ in range(trials)) / trials
    i = torch.arange(1, r + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, r + 1, dtype=torch.float64)[None, :]
    expected = i * j / (d * torch.minimum(i, j))
    torch.testing.assert_close(mean, expected, rtol=0.15, atol=0.01)


def test_ranks():
    assert effective_rank(torch.tensor([3.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert effective_rank(torch.ones(5)) == pytest.approx(5.0)
    assert stable_rank(torch.tensor([2.0, 1.0])) == pytest.approx(1.25)


@pytest.fixture(scope="module")
def peft_adapters(tmp_path_factory):
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=48,
                                                                num_hidden_layers=2, num_attention_heads=4))
    root = tmp_path_factory.mktemp("inspect")
    hf.save_pretrained(root / "base")
    folders = []
    for seed, dora in ((1, False), (2, True)):
        torch.manual_seed(seed)
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                                 use_dora=dora)
        peft.get_peft_model(copy.deepcopy(hf), config).save_pretrained(root / f"a{seed}")
        folders.append(root / f"a{seed}")
    return hf, root / "base", folders


def test_inspect_an_adapter_saved_by_hf_peft(peft_adapters, tmp_path):
    hf, base, (plain, dora) = peft_adapters
    stats = inspect_adapter(plain, base)
    assert [s.module for s in stats] == [
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")
    ]
    layer = hf.model.layers[1].self_attn.v_proj
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), plain)
    dense = pm.base_model.model.model.layers[1].self_attn.v_proj.get_delta_weight("default").double()
    s = stats[3]
    assert s.delta_fro == pytest.approx(float(torch.linalg.norm(dense)), rel=1e-6)
    assert s.relative_delta == pytest.approx(
        float(torch.linalg.norm(dense) / torch.linalg.norm(layer.weight.detach().double())), rel=1e-6
    )
    torch.testing.assert_close(torch.tensor(s.singular_values, dtype=torch.float64), torch.linalg.svdvals(dense)[:4],
                               rtol=1e-6, atol=1e-8)
    dora_stats = inspect_adapter(dora, base)
    assert all(d.magnitude_change is not None for d in dora_stats)
    assert "||dW||/||W||" in format_table(stats)
    comparison = compare_adapters(plain, dora)
    assert len(comparison) == 4 and len(comparison[stats[0].module]) == 4
    saved = json.loads(write_json(stats, tmp_path / "inspect.json", comparison).read_text())
    assert saved["layers"][3]["rank"] == 4 and "subspace_similarity" in saved


def test_inspect_without_a_base_still_gives_the_spectra(peft_adapters):
    _, _, (plain, _) = peft_adapters
    stats = inspect_adapter(plain)
    assert all(s.relative_delta is None and s.delta_fro > 0 for s in stats)


def test_plots_are_written(peft_adapters, tmp_path):
    from peftcore.analysis.plots import plot_relative_heatmap, plot_similarity, plot_spectra

    _, base, (plain, dora) = peft_adapters
    stats = inspect_adapter(plain, base)
    for path in (plot_spectra(stats, tmp_path / "spectra.png"), plot_relative_heatmap(stats, tmp_path / "heat.png"),
                 plot_similarity(compare_adapters(plain, dora), tmp_path / "phi.png")):
        assert path.stat().st_size > 5000 and path.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="needs the base checkpoint"):
        plot_relative_heatmap(inspect_adapter(plain), tmp_path / "x.png")


def tiny_llama():
    from peftcore.models import LlamaConfig, from_config

    torch.manual_seed(0)
    return from_config(LlamaConfig(vocab_size=30, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1))


def test_prompt_stats_find_the_vocabulary_rows_a_prompt_was_copied_from():
    from peftcore import PrefixTuningConfig, PromptTuningConfig, get_peft_model
    from peftcore.analysis.live import prompt_stats

    model = tiny_llama()
    pm = get_peft_model(model, PromptTuningConfig(num_virtual_tokens=3))
    with torch.no_grad():
        pm.prompt_encoder["default"].embedding.weight.copy_(model.model.embed_tokens.weight[[4, 9, 17]] * 3)
    stats = prompt_stats(pm, top_k=2)
    assert [t["nearest_ids"][0] for t in stats["virtual_tokens"]] == [4, 9, 17]
    assert stats["virtual_tokens"][0]["cosine"][0] == pytest.approx(1.0, abs=1e-4)
    norm = float(model.model.embed_tokens.weight[4].norm() * 3)
    assert stats["virtual_tokens"][0]["norm"] == pytest.approx(norm, rel=1e-5)
    prefix = prompt_stats(get_peft_model(tiny_llama(), PrefixTuningConfig(num_virtual_tokens=2)))
    assert len(prefix["key_norm_per_layer"]) == 2 and len(prefix["value_norm_per_layer"]) == 2


def test_activation_hooks_split_base_and_adapter_branches():
    from peftcore import LoraConfig, get_peft_model
    from peftcore.analysis.live import AdapterActivations

    pm = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    ids = torch.randint(0, 30, (2, 5))
    with AdapterActivations(pm) as acts:
        pm(ids)
    summary = acts.summary()
    assert len(summary) == 4 and all(s["adapter_rms"] == 0 and s["base_rms"] > 0 for s in summary.values())  # B = 0
    with torch.no_grad():
        pm.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.fill_(0.5)
    with AdapterActivations(pm) as acts:
        pm(ids)
    ratios = {k: v["ratio"] for k, v in acts.summary().items()}
    assert ratios["model.layers.0.self_attn.q_proj"] > 0 and ratios["model.layers.1.self_attn.q_proj"] == 0
    pm(ids)  # hooks removed on exit: no further records
    assert all(v["calls"] == 1 for v in acts.summary().values())


def test_cli_inspect_prints_the_table_and_writes_json_and_plots(peft_adapters, tmp_path, capsys):
    from peftcore.cli import main

    _, base, (plain, dora) = peft_adapters
    assert main(["inspect", str(plain), "--base", str(base), "--compare", str(dora),
                 "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "model.layers.1.self_attn.v_proj" in out and "||dW||/||W||" in out
    saved = json.loads((tmp_path / "inspect.json").read_text())
    assert saved["layers"][0]["relative_delta"] > 0
    # --compare: the phi table in the terminal too, its numbers those of inspect.json
    assert f"subspace similarity phi: {plain.name} (rows) vs {dora.name} (columns)" in out
    module, grid = next(iter(saved["subspace_similarity"].items()))
    row = next(line for line in out.splitlines() if line.startswith(module[-44:]) and "x" in line.split()[1])
    assert f"{grid[0][0]:8.3f}".strip() == row.split()[2]
    assert {p.name for p in tmp_path.glob("*.png")} == {
        "inspect_spectra.png", "inspect_relative_norms.png", "inspect_similarity.png"
    }


def test_training_logs_adapter_statistics_every_n_steps(tmp_path):
    """inspect_every=2: every 2nd metrics.jsonl line carries per-layer statistics equal to
    peftcore.analysis.lowrank on the live weights, the activation ratio of the adapter branch, and a plot."""
    from peftcore.analysis.live import training_stats
    from peftcore.training.loop import train
    from tests.peftcore.training.test_loop import quiet, rows, tiny_peft_model

    model = tiny_peft_model()
    train(model, rows(), [], quiet(max_steps=4, batch_size=4, learning_rate=1e-2, inspect_every=2, plots=True),
          tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert ["adapter_stats" in r for r in records] == [False, True, False, True]
    logged = records[-1]["adapter_stats"]
    assert sorted(logged) == [f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("q_proj", "v_proj")]
    live = training_stats(model)  # the weights after step 4 are the ones the last record saw
    for name, stats in logged.items():
        assert stats["relative_delta"] == pytest.approx(live[name]["relative_delta"], rel=1e-4)
        assert stats["relative_delta"] > 0 and 0 < stats["activation_ratio"] < 10  # B moved off zero
        layer = dict(model.named_modules())[f"base_model.model.{name}"]
        dense = (layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight).detach()
        expected = float(torch.linalg.norm(dense) / torch.linalg.norm(layer.base_layer.weight))
        assert stats["relative_delta"] == pytest.approx(expected, rel=1e-4)
    assert records[1]["adapter_stats"] != records[3]["adapter_stats"]
    pytest.importorskip("matplotlib")
    assert (tmp_path / "adapter_norms.png").stat().st_size > 0


def test_training_logs_prompt_norms(tmp_path):
    from peftcore import PromptTuningConfig, get_peft_model
    from peftcore.models import LlamaConfig, from_config
    from peftcore.training.loop import train
    from tests.peftcore.training.test_loop import quiet, rows

    model = get_peft_model(from_config(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24,
                                                   num_hidden_layers=1, num_attention_heads=2)),
                           PromptTuningConfig(num_virtual_tokens=3))
    train(model, rows(), [], quiet(max_steps=1, inspect_every=1), tmp_path)
    record = json.loads((tmp_path / "metrics.jsonl").read_text())
    norms = record["adapter_stats"]["prompt"]["virtual_token_norms"]
    expected = model.prompt_encoder["default"].embedding.weight.norm(dim=-1)
    assert norms == pytest.approx(expected.tolist(), rel=1e-4)


def test_a_multitask_model_logs_its_layers_under_the_adapter_files_names(tmp_path):
    from peftcore.training.loop import train
    from tests.peftcore.multitask.test_model import all_rows, quiet, tiny_multitask

    train(tiny_multitask(), all_rows(), [], quiet(max_steps=2, batch_size=4, inspect_every=2), tmp_path)
    logged = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["adapter_stats"]
    assert "model.layers.0.self_attn.q_proj" in logged and "lm_head" in logged
    assert all(0 < stats["activation_ratio"] < 10 for stats in logged.values())  # step 2's forward: B moved at step 1


# -- base weights: Hub layouts, tied lm_head, sharded, streamed; strict JSON; values vs dense ---------------------
def dense_amplification(dW: torch.Tensor, W: torch.Tensor, r: int) -> float:
    U, _, Vh = torch.linalg.svd(dW)
    return float(torch.linalg.norm(dW) / torch.linalg.norm(U[:, :r].T @ W @ Vh[:r].T))


@pytest.fixture(scope="module")
def gpt2_hub_layout(tmp_path_factory):
    """A tiny GPT-2 saved as the Hub's gpt2 is: keys without "transformer.", no lm_head.weight (tied to wte);
    and an HF PEFT adapter on the Conv1D layers (fan_in_fan_out, attn.c_proj square) and the tied lm_head."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=16)
    )
    root = tmp_path_factory.mktemp("gpt2")
    (root / "base").mkdir()
    hf.config.save_pretrained(root / "base")
    state = {
        k.removeprefix("transformer."): v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"
    }
    save_file(state, str(root / "base" / "model.safetensors"), metadata={"format": "pt"})
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "lm_head"], fan_in_fan_out=True,
                             init_lora_weights=False)
    pm = peft.get_peft_model(copy.deepcopy(hf), config)
    pm.save_pretrained(root / "adapter")
    return pm, root / "base", root / "adapter"


def test_a_hub_layout_gpt2_base_gives_amplification_of_conv1d_and_tied_lm_head_layers(gpt2_hub_layout):
    pm, base, adapter = gpt2_hub_layout
    stats = {s.module: s for s in inspect_adapter(adapter, base)}
    assert "lm_head" in stats and "transformer.h.1.attn.c_proj" in stats and len(stats) == 7
    modules = dict(pm.base_model.model.named_modules())
    for name, s in stats.items():
        layer = modules[name]
        base_layer = layer.base_layer
        # Conv1D stores (in, out); the tied lm_head's weight is the input embedding wte
        W = (
            base_layer.weight.T if isinstance(base_layer, transformers.pytorch_utils.Conv1D) else base_layer.weight
        ).detach().double()
        if name == "lm_head":
            assert base_layer.weight is modules["transformer.wte"].weight
        dW = (
            layer.scaling["default"] * layer.lora_B["default"].weight.double() @ layer.lora_A["default"].weight.double()
        ).detach()
        assert s.relative_delta == pytest.approx(float(torch.linalg.norm(dW) / torch.linalg.norm(W)), rel=1e-6), name
        assert s.amplification == pytest.approx(dense_amplification(dW, W, 4), rel=1e-6), name


def test_a_base_without_the_adapted_modules_is_an_error_naming_them(gpt2_hub_layout, peft_adapters, capsys):
    from peftcore.cli import main

    _, llama_base, _ = peft_adapters
    _, _, adapter = gpt2_hub_layout
    with pytest.raises(ValueError, match=r"no weight for 6 of 7 adapted module\(s\) "
                                         r"\(transformer.h.0.attn.c_attn, .*keys look like"):
        inspect_adapter(adapter, llama_base)
    assert main(["inspect", str(adapter), "--base", str(llama_base), "--output-dir", str(adapter / "out")]) == 1
    captured = capsys.readouterr()
    assert "transformer.h.0.attn.c_attn" in captured.err and len(captured.err.strip().splitlines()) == 1
    assert "pass --base" not in captured.out + captured.err


def test_a_base_of_another_shape_is_an_error(peft_adapters, tmp_path):
    hf, _, (plain, _) = peft_adapters
    from safetensors.torch import save_file

    (tmp_path / "config.json").write_text("{}")
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    state["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(32, 31)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"q_proj.weight has shape \(32, 31\), but the adapter's .*q_proj is 32 x 32"):
        inspect_adapter(plain, tmp_path)


def test_a_sharded_base_gives_the_same_numbers(peft_adapters, tmp_path):
    hf, base, (plain, _) = peft_adapters
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert [asdict_(s) for s in inspect_adapter(plain, tmp_path)] == [asdict_(s) for s in inspect_adapter(plain, base)]


def asdict_(stats):
    import dataclasses

    return dataclasses.asdict(stats)


def test_base_weights_are_read_one_at_a_time_with_one_float64_copy(peft_adapters, monkeypatch):
    """Each layer's base weight is read when that layer is measured and freed before the next is read,
    and converting it costs one float64 copy (not one per statistic)."""
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode

    import peftcore.analysis.lowrank as inspect_module

    _, base, (plain, _) = peft_adapters
    alive, original = [], inspect_module.layer_stats

    def watched(module, A, B, scale, W, magnitude):
        assert all(ref() is None for ref in alive), "a previous layer's base weight is still in memory"
        alive.append(weakref.ref(W))
        return original(module, A, B, scale, W, magnitude)

    class CountCopies(TorchDispatchMode):
        copies = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.dtype == torch.float64 and out.numel() >= 32 * 32:
                CountCopies.copies += 1
            return out

    monkeypatch.setattr(inspect_module, "layer_stats", watched)
    with CountCopies():
        stats = inspect_adapter(plain, base)
    assert len(alive) == len(stats) == 4 and CountCopies.copies == 4


def test_no_dense_out_x_in_delta_is_ever_built(tmp_path):
    """r = 2 << 64 = in = out: no op may produce a 64 x 64 tensor from smaller ones (B @ A would);
    reading or converting the base weight itself is allowed."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=40, hidden_size=64, intermediate_size=32,
                                                                num_hidden_layers=1, num_attention_heads=4))
    hf.save_pretrained(tmp_path / "base")
    for dora in (False, True):
        config = peft.LoraConfig(r=2, target_modules=["q_proj", "o_proj"], init_lora_weights=False, use_dora=dora)
        peft.get_peft_model(copy.deepcopy(hf), config).save_pretrained(tmp_path / f"a{dora}")

    class NoDense(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            if inputs and all(t.numel() < 64 * 64 for t in inputs):
                assert not any(isinstance(t, torch.Tensor) and t.numel() >= 64 * 64 for t in tree_leaves(out)), func
            return out

    with NoDense(), pytest.raises(AssertionError):
        torch.randn(64, 2) @ torch.randn(2, 64)  # the guard does catch a dense product
    with NoDense():
        for dora in (False, True):
            assert all(s.amplification > 0 for s in inspect_adapter(tmp_path / f"a{dora}", tmp_path / "base"))
            compare_adapters(tmp_path / f"a{dora}", tmp_path / "aFalse")


def test_a_zero_delta_has_rank_zero_and_strict_json(peft_adapters, tmp_path):
    """HF PEFT's default init saves B = 0: dW = 0 has no direction, so both ranks are 0 (not NaN / 1)."""
    hf, base, _ = peft_adapters
    peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(
        tmp_path / "zero"
    )
    stats = inspect_adapter(tmp_path / "zero", base)
    assert all(s.stable_rank == 0 and s.effective_rank == 0 and s.delta_fro == 0 and s.relative_delta == 0
               for s in stats)
    assert "inf" in format_table(stats)  # ||A|| / ||B|| with B = 0
    stats[0].relative_delta = float("nan")  # what a zero base weight would give
    text = write_json(stats, tmp_path / "inspect.json").read_text()
    payload = json.loads(text)
    json.dumps(payload, allow_nan=False)
    assert "NaN" not in text and payload["layers"][0]["relative_delta"] is None
    assert stable_rank(torch.tensor([1e-200, 1e-200], dtype=torch.float64)) == pytest.approx(2.0)
    assert stable_rank(torch.zeros(3)) == 0 and effective_rank(torch.zeros(3)) == 0


def test_dora_magnitude_change_equals_the_dense_row_norms(peft_adapters):
    hf, base, (_, dora) = peft_adapters
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), dora)
    modules = dict(pm.base_model.model.named_modules())
    for s in inspect_adapter(dora, base):
        layer = modules[s.module]
        row_norms = layer.base_layer.weight.detach().double().norm(dim=1)
        change = (layer.lora_magnitude_vector["default"].weight.detach().double() - row_norms) / row_norms
        assert s.magnitude_change["mean"] == pytest.approx(float(change.mean()), rel=1e-6, abs=1e-9)
        assert s.magnitude_change["max_abs"] == pytest.approx(float(change.abs().max()), rel=1e-6)
        assert s.magnitude_change["max_abs"] > 1e-3  # init_lora_weights=False: m = ||W + dW|| moved off ||W||


def test_scale_and_factor_norms_under_rslora_and_patterns(peft_adapters, tmp_path):
    hf, base, _ = peft_adapters
    torch.manual_seed(3)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                             use_rslora=True, rank_pattern={"v_proj": 2},
                             alpha_pattern={r"layers\.1\.self_attn\.q_proj": 20})
    pm = peft.get_peft_model(copy.deepcopy(hf), config)
    pm.save_pretrained(tmp_path)
    modules = dict(pm.base_model.model.named_modules())
    scales = set()
    for s in inspect_adapter(tmp_path, base):
        layer = modules[s.module]
        A, B = layer.lora_A["default"].weight.detach().double(), layer.lora_B["default"].weight.detach().double()
        assert s.scale == pytest.approx(layer.scaling["default"], rel=1e-12) and s.rank == A.shape[0]
        assert s.norm_A == pytest.approx(float(torch.linalg.norm(A)), rel=1e-6)
        assert s.norm_B == pytest.approx(float(torch.linalg.norm(B)), rel=1e-6)
        assert s.delta_fro == pytest.approx(float(torch.linalg.norm(layer.scaling["default"] * B @ A)), rel=1e-6)
        scales.add(round(s.scale, 9))
    assert scales == {round(8 / 2, 9), round(8 / 2 ** 0.5, 9), round(20 / 2, 9)}  # rsLoRA: alpha / sqrt(r)


def test_the_table_shows_scale_factor_balance_and_dora_magnitude(peft_adapters):
    _, base, (plain, dora) = peft_adapters
    plain_table, dora_table = format_table(inspect_adapter(plain, base)), format_table(inspect_adapter(dora, base))
    assert "scale" in plain_table and "||A||/||B||" in plain_table and " dm" not in plain_table.splitlines()[0]
    head, _, first = dora_table.splitlines()[:3]
    assert head.split()[-1] == "dm" and first.split()[2] == "2"  # lora_alpha 8 / r 4
    s = inspect_adapter(dora, base)[0]
    assert float(first.split()[-2]) == pytest.approx(s.norm_A / s.norm_B, rel=1e-2)
    assert float(first.split()[-1]) == pytest.approx(s.magnitude_change["mean"], rel=1e-2)


def test_comparing_adapters_of_different_widths_is_a_one_line_error(peft_adapters, tmp_path, capsys):
    from peftcore.cli import main

    _, _, (plain, _) = peft_adapters
    wide = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=40, hidden_size=48, intermediate_size=48,
                                                                  num_hidden_layers=2, num_attention_heads=4))
    peft.get_peft_model(wide, peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)).save_pretrained(
        tmp_path / "w"
    )
    with pytest.raises(ValueError,
                       match=r"model.layers.0.self_attn.q_proj: lora_A is \(4, 32\) in .* but \(2, 48\) in"):
        compare_adapters(plain, tmp_path / "w")
    assert main(["inspect", str(plain), "--compare", str(tmp_path / "w"), "--output-dir", str(tmp_path / "o")]) == 1
    assert "(4, 32)" in capsys.readouterr().err


def test_a_bin_only_hf_adapter_is_read(peft_adapters, tmp_path):
    hf, base, (plain, _) = peft_adapters
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), plain)
    pm.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert not (tmp_path / "bin" / "adapter_model.safetensors").exists()
    assert [asdict_(s) for s in inspect_adapter(tmp_path / "bin", base)] == [
        asdict_(s) for s in inspect_adapter(plain, base)
    ]
    (tmp_path / "bin" / "adapter_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match="no adapter_model.safetensors \\(or adapter_model.bin\\) in"):
        inspect_adapter(tmp_path / "bin")


def test_the_phi_plot_has_integer_ticks(tmp_path, monkeypatch):
    """i and j count singular directions: no tick at 2.5 (r = 8) nor 0.5 (r = 1)."""
    pytest.importorskip("matplotlib")
    import peftcore.analysis.plots as plots

    figures = []
    monkeypatch.setattr(plots, "save", lambda fig, path: figures.append(fig))
    grids = {f"model.layers.0.self_attn.{m}": subspace_similarity(torch.randn(r, 16), torch.randn(r, 16)).tolist()
             for m, r in (("q_proj", 1), ("v_proj", 8))}
    plots.plot_similarity(grids, tmp_path / "phi.png")
    figures[0].canvas.draw()
    for ax in figures[0].axes[:2]:
        for ticks, (low, high) in ((ax.get_xticks(), ax.get_xlim()), (ax.get_yticks(), ax.get_ylim())):
            shown = [t for t in ticks if low <= t <= high]
            assert shown and all(float(t).is_integer() for t in shown), shown
