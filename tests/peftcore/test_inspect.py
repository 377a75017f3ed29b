import copy
import json

import peft
import pytest
import torch
import transformers
from hypothesis import given
from hypothesis import strategies as st

from peftcore.inspect import (
    amplification_factor, compare_adapters, effective_rank, format_table, inspect_adapter, lowrank_svd,
    stable_rank, subspace_similarity, write_json,
)


@given(out=st.integers(2, 24), inp=st.integers(2, 24), r=st.integers(1, 8), scale=st.floats(0.1, 4.0), seed=st.integers(0, 99))
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
    W, B, A = torch.randn(40, 30, dtype=torch.float64), torch.randn(40, 4, dtype=torch.float64), torch.randn(4, 30, dtype=torch.float64)
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
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False, use_dora=dora)
        peft.get_peft_model(copy.deepcopy(hf), config).save_pretrained(root / f"a{seed}")
        folders.append(root / f"a{seed}")
    return hf, root / "base", folders


def test_inspect_an_adapter_saved_by_hf_peft(peft_adapters, tmp_path):
    hf, base, (plain, dora) = peft_adapters
    stats = inspect_adapter(plain, base)
    assert [s.module for s in stats] == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    layer = hf.model.layers[1].self_attn.v_proj
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), plain)
    dense = pm.base_model.model.model.layers[1].self_attn.v_proj.get_delta_weight("default").double()
    s = stats[3]
    assert s.delta_fro == pytest.approx(float(torch.linalg.norm(dense)), rel=1e-6)
    assert s.relative_delta == pytest.approx(float(torch.linalg.norm(dense) / torch.linalg.norm(layer.weight.detach().double())), rel=1e-6)
    torch.testing.assert_close(torch.tensor(s.singular_values, dtype=torch.float64), torch.linalg.svdvals(dense)[:4], rtol=1e-6, atol=1e-8)
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
    from peftcore.inspect_plots import plot_relative_heatmap, plot_similarity, plot_spectra

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
    from peftcore.inspect_runtime import prompt_stats

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
    from peftcore.inspect_runtime import AdapterActivations

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
    assert main(["inspect", str(plain), "--base", str(base), "--compare", str(dora), "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "model.layers.1.self_attn.v_proj" in out and "||dW||/||W||" in out
    assert json.loads((tmp_path / "inspect.json").read_text())["layers"][0]["relative_delta"] > 0
    assert {p.name for p in tmp_path.glob("*.png")} == {"inspect_spectra.png", "inspect_relative_norms.png", "inspect_similarity.png"}


def test_training_logs_adapter_statistics_every_n_steps(tmp_path):
    """inspect_every=2: every 2nd metrics.jsonl line carries per-layer statistics equal to
    peftcore.inspect on the live weights, the activation ratio of the adapter branch, and a plot."""
    from peftcore.inspect_runtime import training_stats
    from peftcore.train import train
    from tests.peftcore.test_train import quiet, rows, tiny_peft_model

    model = tiny_peft_model()
    train(model, rows(), [], quiet(max_steps=4, batch_size=4, learning_rate=1e-2, inspect_every=2, plots=True), tmp_path)
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
    from peftcore.train import train
    from tests.peftcore.test_train import quiet, rows

    model = get_peft_model(from_config(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                                   num_attention_heads=2)), PromptTuningConfig(num_virtual_tokens=3))
    train(model, rows(), [], quiet(max_steps=1, inspect_every=1), tmp_path)
    record = json.loads((tmp_path / "metrics.jsonl").read_text())
    norms = record["adapter_stats"]["prompt"]["virtual_token_norms"]
    expected = model.prompt_encoder["default"].embedding.weight.norm(dim=-1)
    assert norms == pytest.approx(expected.tolist(), rel=1e-4)


def test_a_multitask_model_logs_its_layers_under_the_adapter_files_names(tmp_path):
    from peftcore.train import train
    from tests.peftcore.test_multitask import all_rows, quiet, tiny_multitask

    train(tiny_multitask(), all_rows(), [], quiet(max_steps=2, batch_size=4, inspect_every=2), tmp_path)
    logged = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["adapter_stats"]
    assert "model.layers.0.self_attn.q_proj" in logged and "lm_head" in logged
    assert all(0 < stats["activation_ratio"] < 10 for stats in logged.values())  # step 2's forward: B moved at step 1
