"""`peftcore inspect` on adapters made by PeftModel.add_weighted_adapter, every combination type, saved with
save_pretrained and read back from their folders. The figures are checked against dense deltas computed here from
the source adapters' factors: "cat" (r' = the sum of the ranks, zero-padded where a layer holds less) reports the
spectrum of the weighted sum of the deltas; "svd" at svd_rank k its top k; "linear" that of (sum sqrt(w s) B)
(sum +-sqrt(w s) A). Padding and round-off directions are not directions of dW: numerical_rank leaves them out,
and so do the amplification factor and the spectra plot."""
import copy
import json
import math
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from peftcore import LoraConfig, get_peft_model
from peftcore.adapter_io import adapter_folder
from peftcore.analysis.lowrank import format_table, inspect_adapter
from peftcore.lora.weighted import FACTORED_TYPES, SVD_TYPES
from peftcore.models import LlamaConfig, from_config, save_pretrained

SOURCES = {  # the ranks per layer follow from these: a has r=4 at layers.1 v_proj, 2 elsewhere; b has 3
    "a": LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                    rank_pattern={"layers.1.self_attn.v_proj": 4}, alpha_pattern={"v_proj": 3}),
    "b": LoraConfig(r=3, lora_alpha=5, target_modules=["q_proj", "o_proj"], init_lora_weights=False, use_rslora=True),
    "c": LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                    rank_pattern={"layers.1.self_attn.v_proj": 4}, alpha_pattern={"v_proj": 3}),
}
SVD_RANK = 3
COMBINATIONS = {  # name (= the type) -> (sources, weights); factored types need one rank per layer: a and c
    "cat": (["a", "b"], [0.7, -1.3]),
    **{t: (["a", "b"], [0.7, -1.3]) for t in SVD_TYPES},
    **{t: (["a", "c"], [0.6, 0.9]) for t in FACTORED_TYPES},
}
NEW_RANK = {"cat": 4 + 3, **{t: SVD_RANK for t in SVD_TYPES}, **{t: 4 for t in FACTORED_TYPES}}


def tiny_llama():
    torch.manual_seed(0)
    return from_config(LlamaConfig(vocab_size=30, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1))


@pytest.fixture(scope="module")
def combined(tmp_path_factory):
    """-> (the PeftModel holding the sources and the combinations, the folder they are saved in, the base folder)."""
    root = tmp_path_factory.mktemp("combined")
    model = tiny_llama()
    save_pretrained(model, root / "base")
    torch.manual_seed(1)
    pm = get_peft_model(copy.deepcopy(model), SOURCES["a"], adapter_name="a")
    for name in ("b", "c"):
        pm.add_adapter(name, SOURCES[name])
    torch.manual_seed(2)  # DARE's draws
    for name, (sources, weights) in COMBINATIONS.items():
        pm.add_weighted_adapter(sources, weights, name, combination_type=name, svd_rank=SVD_RANK, density=0.6)
    pm.save_pretrained(root / "saved")
    return pm, root / "saved", root / "base"


def layers_of(pm, adapter: str) -> dict:
    return {name: m for name, m in pm.model.named_modules() if adapter in getattr(m, "r", {})}


def factors(layer, name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    return layer.lora_A[name].weight.detach().double(), layer.lora_B[name].weight.detach().double(), layer.scaling[name]


def source_delta(layer, name: str) -> torch.Tensor:
    A, B, scaling = factors(layer, name)
    return scaling * B @ A


def weighted_sum(pm, module: str, sources: list[str], weights: list[float]) -> tuple[torch.Tensor, int]:
    """sum_i w_i s_i B_i A_i over the sources this layer holds, in float64; and the sum of their ranks here."""
    layer = pm.model.get_submodule(module)
    held = [(n, w) for n, w in zip(sources, weights) if n in layer.r]
    return sum(w * source_delta(layer, n) for n, w in held), sum(layer.r[n] for n, _ in held)


def by_module(stats) -> dict:
    return {s.module: s for s in stats}


def close(reported: list[float], expected: torch.Tensor) -> None:
    got = torch.tensor(reported, dtype=torch.float64)
    torch.testing.assert_close(got, expected[:len(got)], rtol=1e-5, atol=1e-6 * float(expected[0]))


def dense_amplification(dW: torch.Tensor, W: torch.Tensor, k: int) -> float:
    U, _, Vh = torch.linalg.svd(dW)
    return float(torch.linalg.norm(dW) / torch.linalg.norm(U[:, :k].T @ W @ Vh[:k].T))


def test_every_combination_reports_its_combined_rank_and_the_delta_the_model_adds(combined):
    pm, saved, base = combined
    for name in COMBINATIONS:
        folder = adapter_folder(saved, name)
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["r"] == NEW_RANK[name] == config["lora_alpha"], name
        stats = inspect_adapter(folder, base)
        assert set(by_module(stats)) == set(layers_of(pm, name)), name
        for s in stats:
            layer = pm.model.get_submodule(s.module)
            dW = layer.delta_weight(name).detach().double()
            W = layer.base_layer.weight.detach().double()
            assert s.rank == NEW_RANK[name] and s.scale == 1.0, (name, s.module)
            close(s.singular_values, torch.linalg.svdvals(dW))
            assert s.delta_fro == pytest.approx(float(dW.norm()), rel=1e-5)
            assert s.relative_delta == pytest.approx(float(dW.norm() / W.norm()), rel=1e-5)
            assert s.amplification == pytest.approx(dense_amplification(dW, W, s.numerical_rank), rel=1e-4)


def test_cat_reports_the_spectrum_of_the_weighted_sum_of_the_deltas(combined):
    pm, saved, base = combined
    sources, weights = COMBINATIONS["cat"]
    stats = inspect_adapter(adapter_folder(saved, "cat"), base)
    assert {s.module.rsplit(".", 1)[1] for s in stats} == {"q_proj", "v_proj", "o_proj"}  # the union of targets
    for s in stats:
        expected, ranks = weighted_sum(pm, s.module, sources, weights)
        close(s.singular_values, torch.linalg.svdvals(expected))
        assert s.rank == 7 and s.numerical_rank == ranks  # 5, 2 (v_proj: a alone), 4 (layers.1 v_proj) or 3
        assert len(s.singular_values) == min(7, *expected.shape)
        assert s.effective_rank <= ranks + 1e-9


def test_svd_reports_the_top_svd_rank_singular_values_of_the_merged_delta(combined):
    pm, saved, base = combined
    sources, weights = COMBINATIONS["svd"]
    for s in inspect_adapter(adapter_folder(saved, "svd"), base):
        expected, ranks = weighted_sum(pm, s.module, sources, weights)
        close(s.singular_values, torch.linalg.svdvals(expected)[:SVD_RANK])  # Eckart-Young: the top k, exactly
        assert s.rank == SVD_RANK and s.numerical_rank == min(SVD_RANK, ranks)  # layers.0 v_proj: a's 2 only
    for name in SVD_TYPES:
        for s in inspect_adapter(adapter_folder(saved, name)):
            assert s.rank == SVD_RANK and s.numerical_rank <= SVD_RANK and s.effective_rank <= SVD_RANK + 1e-9
            assert s.stable_rank <= SVD_RANK + 1e-9


def test_linear_reports_the_product_of_the_merged_factors(combined):
    pm, saved, _ = combined
    sources, weights = COMBINATIONS["linear"]
    for s in inspect_adapter(adapter_folder(saved, "linear")):
        layer = pm.model.get_submodule(s.module)
        A, B = 0, 0
        for name, weight in zip(sources, weights):
            A_i, B_i, scaling = factors(layer, name)
            root = math.sqrt(abs(weight * scaling))
            A, B = A + math.copysign(root, weight * scaling) * A_i, B + root * B_i
        close(s.singular_values, torch.linalg.svdvals(B @ A))
        assert s.rank == 4 and s.numerical_rank == layer.r["a"]  # layers.0: 2 directions of the 4 stored


def test_a_combined_adapter_saved_with_per_layer_patterns_reads_the_same(combined, tmp_path):
    """The cat adapter without its padding: each layer at its own rank, rank_pattern / alpha_pattern in the config
    (the global r and lora_alpha wrong on purpose). Scale = alpha_pattern / that layer's rank (rsLoRA: its sqrt)."""
    _, saved, base = combined
    padded = by_module(inspect_adapter(adapter_folder(saved, "cat"), base))
    tensors = load_file(adapter_folder(saved, "cat") / "adapter_model.safetensors")
    config = json.loads((adapter_folder(saved, "cat") / "adapter_config.json").read_text())
    for rslora in (False, True):
        ranks = {m: s.numerical_rank for m, s in padded.items()}
        trimmed = {k: (v[:ranks[module(k)]] if ".lora_A." in k else v[:, :ranks[module(k)]]).contiguous()
                   for k, v in tensors.items()}
        folder = tmp_path / f"rslora{rslora}"
        folder.mkdir()
        save_file(trimmed, folder / "adapter_model.safetensors")
        alphas = {m: math.sqrt(r) if rslora else r for m, r in ranks.items()}
        folder.joinpath("adapter_config.json").write_text(json.dumps(
            {**config, "r": 1, "lora_alpha": 1, "use_rslora": rslora, "rank_pattern": ranks, "alpha_pattern": alphas}))
        for s in inspect_adapter(folder, base):
            p = padded[s.module]
            assert s.rank == ranks[s.module] == s.numerical_rank and s.scale == pytest.approx(1.0)
            close(s.singular_values, torch.tensor(p.singular_values, dtype=torch.float64))
            assert s.delta_fro == pytest.approx(p.delta_fro, rel=1e-6)
            assert s.amplification == pytest.approx(p.amplification, rel=1e-6)  # the padding's directions: none
            assert s.effective_rank == pytest.approx(p.effective_rank, rel=1e-6)


def module(key: str) -> str:
    return key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]


def test_cli_inspect_of_a_cat_adapter_writes_its_figures(combined, tmp_path, capsys):
    from peftcore.cli import main

    pm, saved, base = combined
    out = tmp_path / "out"
    assert main(["inspect", str(adapter_folder(saved, "cat")), "--base", str(base), "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "r(dW)" in printed and "model.layers.1.self_attn.o_proj" in printed
    layers = {layer["module"]: layer for layer in json.loads((out / "inspect.json").read_text())["layers"]}
    sources, weights = COMBINATIONS["cat"]
    for name, layer in layers.items():
        expected, ranks = weighted_sum(pm, name, sources, weights)
        assert layer["rank"] == 7 and layer["numerical_rank"] == ranks
        close(layer["singular_values"], torch.linalg.svdvals(expected))
    assert "r(dW)" not in format_table(inspect_adapter(adapter_folder(saved, "b")))  # b's dW has its r directions
    if (out / "inspect_spectra.png").is_file():  # matplotlib installed
        from peftcore.analysis import plots

        fig = plots.spectra_figure(plots.pyplot(), inspect_adapter(adapter_folder(saved, "cat")))
        drawn = [len(line.get_ydata()) for ax in fig.axes for line in ax.get_lines()]
        assert sorted(drawn) == sorted(layer["numerical_rank"] for layer in layers.values())
        assert "left out" in fig.get_suptitle()
        plots.pyplot().close(fig)


def test_conv_combinations_report_the_reshaped_delta(tmp_path):
    from tests.peftcore.lora.test_conv import CONVS, Convs

    ungrouped = [c for c in CONVS if c != "g2"]  # cat and svd refuse a grouped conv; linear combines it
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(Convs().eval(), LoraConfig(r=2, target_modules=ungrouped, init_lora_weights=False))
        pm.add_adapter("b", LoraConfig(r=3, lora_alpha=5, target_modules=ungrouped, init_lora_weights=False))
        for name in ("c", "d"):
            pm.add_adapter(name, LoraConfig(r=2, target_modules=CONVS, init_lora_weights=False))
        pm.add_weighted_adapter(["default", "b"], [0.7, -1.3], "cat", combination_type="cat")
        pm.add_weighted_adapter(["default", "b"], [0.7, -1.3], "svd", combination_type="svd", svd_rank=2)
        pm.add_weighted_adapter(["c", "d"], [0.6, 0.9], "linear", combination_type="linear")
        pm.save_pretrained(tmp_path, selected_adapters=["cat", "svd", "linear"])
    for name, rank in (("cat", 5), ("svd", 2), ("linear", 2)):
        stats = by_module(inspect_adapter(adapter_folder(tmp_path, name)))
        assert set(stats) == set(CONVS if name == "linear" else ungrouped)
        for conv, s in stats.items():
            layer = pm.model.get_submodule(conv)
            dense = (layer.dense_delta(name) if conv == "g2" else layer.delta_weight(name)).detach().double()
            if name == "cat":  # independently: the weighted sum of the two deltas, flattened
                dense = 0.7 * layer.delta_weight("default").double() - 1.3 * layer.delta_weight("b").double()
            assert s.rank == rank, (name, conv)
            close(s.singular_values, torch.linalg.svdvals(dense.detach().flatten(1)))


def test_hf_peft_combined_adapters_read_as_peft_computes_them(tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=30, hidden_size=16, intermediate_size=24,
                                                                num_hidden_layers=1, num_attention_heads=2))
    targets = ["q_proj", "v_proj"]
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False))
    pm.add_adapter("b", peft.LoraConfig(r=3, lora_alpha=5, target_modules=targets, init_lora_weights=False))
    pm.add_weighted_adapter(["default", "b"], [0.7, -1.3], "cat", combination_type="cat")
    pm.add_weighted_adapter(["default", "b"], [0.7, -1.3], "svd", combination_type="svd", svd_rank=2)
    pm.save_pretrained(tmp_path, selected_adapters=["cat", "svd"])
    for name, rank in (("cat", 5), ("svd", 2)):
        for s in inspect_adapter(tmp_path / name):
            delta = pm.base_model.model.get_submodule(s.module).get_delta_weight(name).detach().double()
            assert s.rank == rank and s.numerical_rank == rank
            close(s.singular_values, torch.linalg.svdvals(delta))


DELTA_FIGURES = ("delta_fro", "delta_spectral", "effective_rank", "stable_rank", "relative_delta", "amplification")
SCALED_FIGURES = ("delta_fro", "delta_spectral", "relative_delta", "amplification")  # linear in dW; the ranks not


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama_base")
    model = tiny_llama()
    save_pretrained(model, folder)
    return model, folder


@settings(max_examples=8, deadline=None)
@given(r=st.integers(1, 4), alpha=st.integers(1, 8), rslora=st.booleans(), pattern=st.booleans(),
       combination=st.sampled_from(["linear", "svd", "cat"]), seed=st.integers(0, 2**16))
def test_one_adapter_at_weight_1_gives_that_adapters_figures(base_model, r, alpha, rslora, pattern, combination, seed):
    """linear: the adapter alone; svd and cat: with a second adapter at weight 0 (one adapter always combines
    linearly). Every figure of dW is that adapter's, times sqrt(r') with rsLoRA (the new adapter keeps use_rslora with
    lora_alpha = r', as in HF PEFT); r and the factors' norms are the new parametrisation's."""
    model, base = base_model
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                        use_rslora=rslora, rank_pattern={"layers.1.self_attn.v_proj": r + 1} if pattern else {},
                        alpha_pattern={"q_proj": alpha + 2} if pattern else {})
    torch.manual_seed(seed)
    pm = get_peft_model(copy.deepcopy(model), config)
    sources, weights = ["default"], [1.0]
    if combination != "linear":
        pm.add_adapter("zero", LoraConfig(r=1, target_modules=["q_proj", "o_proj"], init_lora_weights=False))
        sources, weights = ["default", "zero"], [1.0, 0.0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rsLoRA's: the combined adapter's update is sqrt(r') times the combination
        pm.add_weighted_adapter(sources, weights, "new", combination_type=combination)
    with tempfile.TemporaryDirectory() as folder:
        pm.save_pretrained(folder, selected_adapters=["default", "new"])
        original = by_module(inspect_adapter(folder, base))
        new = by_module(inspect_adapter(Path(folder) / "new", base))
    assert set(original) <= set(new)  # cat and svd: o_proj too, from the zero-weighted adapter, with dW = 0
    factor = math.sqrt(pm.peft_config["new"].r) if rslora else 1.0
    for name, s in new.items():
        if name not in original:
            assert s.delta_fro == 0 and s.numerical_rank == 0
            continue
        o = original[name]
        assert s.numerical_rank == o.numerical_rank == o.rank and s.rank == pm.peft_config["new"].r
        close(s.singular_values[:s.numerical_rank], factor * torch.tensor(o.singular_values, dtype=torch.float64))
        for figure in DELTA_FIGURES:
            expected = getattr(o, figure) * (factor if figure in SCALED_FIGURES else 1.0)
            assert getattr(s, figure) == pytest.approx(expected, rel=1e-4, abs=1e-9), (name, figure)
