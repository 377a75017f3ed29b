"""`peftcore inspect` on LoHa / LoKr adapters (analysis/dense_delta.py): the dense update's spectrum, norms and ranks.

Hand-built files whose spectra are known in closed form (a Hadamard product of two rank-2 products with rank 4 =
r^2; a Kronecker product whose singular values are the products of its factors'), then adapters saved by the
installed peft on tiny models (linear, Conv1d, Conv2d, grouped, 1x1; LoHa's CP form, LoKr's whole / low-rank / CP
w2, decompose_both, decompose_factor, rank and alpha patterns) measured against PEFT's own get_delta_weight and
the base weights, and the command itself (table, inspect.json, plots)."""
import copy
import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local: never reach for the Hub

import peft  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from peftcore.analysis.dense_delta import format_dense_table, inspect_dense_adapter  # noqa: E402
from peftcore.cli import main  # noqa: E402
from peftcore.jobs.inspect import run_inspect  # noqa: E402
from tests.peftcore.lycoris.test_conv import CONVS, convs  # noqa: E402
from tests.peftcore.lycoris.tiny import peft_adapter_params, peft_layers, perturb  # noqa: E402

ROUND_OFF = torch.finfo(torch.float32).eps


def write_adapter(folder, peft_type: str, tensors: dict, **config):
    """An adapter folder as PEFT writes one: adapter_config.json + adapter_model.safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": peft_type, **config}))
    save_file({f"base_model.model.{k}": v.contiguous() for k, v in tensors.items()},
              folder / "adapter_model.safetensors", metadata={"format": "pt"})
    return folder


def loha_rank_four(a=(1.0, 3.0), c=(2.0, 0.5)) -> dict:
    """r = 2 factors whose Hadamard product has rank 4 = r^2 with known singular values: the row vectors
    w1_a[:, p] * w2_a[:, q] have disjoint supports (norm sqrt(2) a_p c_q), the column vectors w1_b[p] * w2_b[q] are
    the unit vectors e_0..e_3, so dW = scale * sum_pq u_pq e_pq^T, sigma = scale * sqrt(2) * a_p * c_q."""
    halves = torch.tensor([[1.0, 0.0]] * 4 + [[0.0, 1.0]] * 4)  # (8, 2): rows 0-3 | rows 4-7
    alternate = torch.tensor([[1.0, 0.0], [0.0, 1.0]] * 4)  # (8, 2): even rows | odd rows
    return {"fc.hada_w1_a": halves * torch.tensor(a), "fc.hada_w1_b": torch.tensor([[1.0, 1, 0, 0], [0, 0, 1, 1]]),
            "fc.hada_w2_a": alternate * torch.tensor(c), "fc.hada_w2_b": torch.tensor([[1.0, 0, 1, 0], [0, 1, 0, 1]])}


def test_a_hadamard_product_of_two_rank_2_products_has_rank_4_and_its_known_spectrum(tmp_path):
    folder = write_adapter(tmp_path / "loha", "LOHA", loha_rank_four(), r=2, alpha=6)
    (s,) = inspect_dense_adapter(folder)
    scale = 6 / 2
    expected = sorted((scale * math.sqrt(2) * a * c for a in (1.0, 3.0) for c in (2.0, 0.5)), reverse=True)
    assert (s.method, s.rank, s.scale, s.shape) == ("LoHa", 2, scale, [8, 4])
    assert (s.max_rank, s.max_rank_rule, s.numerical_rank) == (4, "r^2", 4)  # beyond r = 2: the Hadamard product
    assert s.singular_values == pytest.approx(expected, rel=1e-12)
    assert s.delta_fro == pytest.approx(math.sqrt(sum(v * v for v in expected)), rel=1e-12)
    assert s.delta_spectral == pytest.approx(expected[0])
    p = torch.tensor(expected, dtype=torch.float64) / sum(expected)
    assert s.effective_rank == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-9)
    assert s.stable_rank == pytest.approx(sum(v * v for v in expected) / expected[0] ** 2, rel=1e-9)


def test_a_hadamard_product_with_a_constant_factor_keeps_the_other_factors_rank(tmp_path):
    """(w2_a w2_b) = ones: dW = scale * w1_a w1_b, rank 2 of the 4 LoHa allows; w2_b = 0: dW = 0, rank 0."""
    tensors = loha_rank_four()
    tensors["fc.hada_w2_a"] = torch.tensor([[1.0, 0.0]] * 8)
    tensors["fc.hada_w2_b"] = torch.tensor([[1.0] * 4, [0.0] * 4])
    (s,) = inspect_dense_adapter(write_adapter(tmp_path / "ones", "LOHA", tensors, r=2, alpha=2))
    # w1_a's columns (norms 2 * a_p) are orthogonal, w1_b's rows (norm sqrt 2) too
    assert (s.max_rank, s.numerical_rank) == (4, 2)
    assert s.singular_values[:2] == pytest.approx([2 * 3 * math.sqrt(2), 2 * math.sqrt(2)], rel=1e-12)
    assert max(s.singular_values[2:]) < 1e-12
    tensors["fc.hada_w2_b"] = torch.zeros(2, 4)
    (zero,) = inspect_dense_adapter(write_adapter(tmp_path / "zero", "LOHA", tensors, r=2, alpha=2))
    assert (zero.numerical_rank, zero.delta_fro, zero.effective_rank, zero.stable_rank) == (0, 0.0, 0.0, 0.0)


def test_a_kronecker_product_has_the_products_of_its_factors_singular_values(tmp_path):
    """w1 = diag(1, 3), w2 of singular values (2, 0.5, 0): dW's are scale * {1, 3} x {2, 0.5}, rank 2 x 2 = 4 of the
    2 x 3 whole factors allow; r comes from the config (both factors whole store none)."""
    w2 = torch.zeros(3, 4)
    w2[0, 0], w2[1, 1] = 2.0, 0.5
    tensors = {"fc.lokr_w1": torch.diag(torch.tensor([1.0, 3.0])), "fc.lokr_w2": w2}
    folder = write_adapter(tmp_path / "lokr", "LOKR", tensors, r=4, alpha=8, rank_pattern={}, alpha_pattern={})
    (s,) = inspect_dense_adapter(folder)
    assert (s.method, s.rank, s.scale, s.shape) == ("LoKr", 4, 2.0, [6, 8])
    assert (s.max_rank, s.max_rank_rule, s.numerical_rank) == (6, "2 x 3", 4)
    assert s.factors == {"w1 shape": [2, 2], "w1 rank": 2, "w2 shape": [3, 4], "w2 rank": 2}
    assert s.singular_values[:4] == pytest.approx([12.0, 4.0, 3.0, 1.0], rel=1e-12)
    assert s.delta_fro == pytest.approx(2.0 * math.sqrt(10) * math.sqrt(4.25), rel=1e-12)  # ||kron|| = ||w1|| ||w2||
    table = format_dense_table([s])
    assert "kron(w1, w2)" in table and "6 (2 x 3)" in table.splitlines()[-1]


def test_a_file_missing_a_factor_is_one_line(tmp_path):
    tensors = loha_rank_four()
    del tensors["fc.hada_w1_b"]
    with pytest.raises(ValueError, match=r"^fc: the adapter file lacks hada_w1_b, which its other factors") as info:
        inspect_dense_adapter(write_adapter(tmp_path, "LOHA", tensors, r=2, alpha=2))
    assert "\n" not in str(info.value)


# case -> (method, config kwargs for peft); every factor random (init_weights=False) and perturbed
CASES = {
    "loha_flat": ("loha", dict(target_modules=CONVS + ["head"], r=2)),
    "loha_cp": ("loha", dict(target_modules=CONVS, r=2, use_effective_conv2d=True)),
    "loha_patterns": ("loha", dict(target_modules=["c2", "head"], r=2, alpha=4, rank_pattern={"c2": 3},
                                   alpha_pattern={"head": 5})),
    "lokr_whole_w2": ("lokr", dict(target_modules=CONVS, r=8)),
    "lokr_low_rank_w2": ("lokr", dict(target_modules=CONVS + ["head"], r=1, decompose_both=True)),
    # c1 left out: PEFT 0.21.2's get_delta_weight crashes on a CP w2 with a unit kernel axis (lycoris/test_conv.py)
    "lokr_cp": ("lokr", dict(target_modules=["c2", "g2", "p2"], r=1, use_effective_conv2d=True)),
    "lokr_decompose_factor": ("lokr", dict(target_modules=CONVS + ["head"], r=2, decompose_both=True,
                                           decompose_factor=2)),
    "lokr_patterns": ("lokr", dict(target_modules=["c1", "head"], r=8, alpha=3, rank_pattern={"c1": 2},
                                   alpha_pattern={"head": 7})),
}


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("conv_base")
    save_file({k: v.contiguous() for k, v in convs().state_dict().items()}, folder / "model.safetensors")
    return folder


def peft_saved(method: str, kwargs: dict, folder, init_weights=False):
    config_cls = {"loha": peft.LoHaConfig, "lokr": peft.LoKrConfig}[method]
    torch.manual_seed(5)
    model = peft.get_peft_model(copy.deepcopy(convs()), config_cls(**kwargs, init_weights=init_weights))
    if not init_weights:
        perturb(peft_adapter_params(model))
    model.save_pretrained(folder)
    return model


def matrix_rank(delta: torch.Tensor) -> int:
    """numpy's matrix_rank tolerance at float32 eps, as lowrank.numerical_rank."""
    return int(torch.linalg.matrix_rank(delta, rtol=max(delta.shape) * ROUND_OFF))


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_peft_adapter_is_measured_as_pefts_own_delta_weight(case, base_folder, tmp_path):
    method, kwargs = CASES[case]
    model = peft_saved(method, kwargs, tmp_path)
    stats = {s.module: s for s in inspect_dense_adapter(tmp_path, base_folder)}
    layers = peft_layers(model)
    assert sorted(stats) == sorted(layers)
    base = convs()
    for name, layer in layers.items():
        s = stats[name]
        with torch.no_grad():
            delta = layer.get_delta_weight("default").double().flatten(1)  # (out, in / groups * prod kernel)
        assert delta.abs().max() > 1e-3  # non-triviality: a zero delta would match anything zero
        assert (s.rank, s.scale) == (layer.r["default"], pytest.approx(layer.scaling["default"]))
        assert s.shape == list(delta.shape)
        S = torch.linalg.svdvals(delta)
        torch.testing.assert_close(torch.tensor(s.singular_values, dtype=torch.float64), S[:len(s.singular_values)],
                                   rtol=1e-5, atol=1e-6 * float(S[0]))
        assert s.delta_fro == pytest.approx(float(torch.linalg.norm(delta)), rel=1e-5)
        # generic (random) factors reach the rank the method's form allows: r^2, or rank w1 x rank w2
        assert s.numerical_rank == matrix_rank(delta) == s.max_rank
        if method == "lokr":
            assert s.factors["w1 rank"] * s.factors["w2 rank"] == s.numerical_rank
        W = base.get_submodule(name).weight.detach().double().flatten(1)
        assert s.relative_delta == pytest.approx(float(torch.linalg.norm(delta) / torch.linalg.norm(W)), rel=1e-5)
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        k = s.numerical_rank
        projected = U[:, :k].T @ W @ Vh[:k].T
        assert s.amplification == pytest.approx(float(torch.linalg.norm(S[:k]) / torch.linalg.norm(projected)),
                                                rel=1e-4)


def test_the_cp_form_and_the_low_rank_forms_bound_the_rank_as_the_table_says(tmp_path):
    """LoHa's CP form and LoKr's decompositions: their factors are rank-r products (CP cores included), so the
    bounds are r^2 and r x r; with whole w1 it is min(w1's sides) x r."""
    peft_saved("loha", CASES["loha_cp"][1], tmp_path / "loha")
    loha = {s.module: s for s in inspect_dense_adapter(tmp_path / "loha")}
    assert {m: (s.max_rank, s.max_rank_rule) for m, s in loha.items()} == {m: (4, "r^2") for m in CONVS}
    assert loha["c1"].shape == [6, 4 * 3] and loha["c2"].shape == [8, 4 * 3 * 2]  # kernels flattened into `in`
    peft_saved("lokr", CASES["lokr_decompose_factor"][1], tmp_path / "lokr")
    lokr = {s.module: s for s in inspect_dense_adapter(tmp_path / "lokr")}
    # decompose_factor=2: head (5, 12) -> w1 (1, 2) (5 is prime: 1 x 5), w2 (5, 6); r = 2 < max(5, 6) / 2 = 3
    assert lokr["head"].factors["w1 shape"] == [1, 2] and lokr["head"].factors["w2 shape"] == [5, 6]
    assert (lokr["head"].max_rank, lokr["head"].max_rank_rule) == (2, "1 x 2")


def test_a_fresh_adapter_has_no_direction_and_still_draws(tmp_path, capsys):
    """init_weights=True zeroes a factor: dW = 0, r(dW) 0, effective rank 0; the report still writes its files."""
    peft_saved("loha", dict(target_modules=["c2", "head"], r=2), tmp_path / "fresh", init_weights=True)
    stats = inspect_dense_adapter(tmp_path / "fresh")
    assert all((s.numerical_rank, s.delta_fro, s.effective_rank) == (0, 0.0, 0.0) for s in stats)
    written = run_inspect(tmp_path / "fresh", output_dir=tmp_path / "out")
    assert {p.name for p in written} == {"inspect.json", "inspect_spectra.png"}


@pytest.fixture
def llama(base):  # the analysis tests' shared checkpoint (conftest.py), under this file's name for it
    return base


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_the_command_prints_the_table_and_writes_json_and_plots(llama, method, tmp_path, capsys):
    config = (peft.LoHaConfig(target_modules=["q_proj", "v_proj"], r=2, init_weights=False) if method == "loha" else
              peft.LoKrConfig(target_modules=["q_proj", "v_proj"], r=2, decompose_both=True, init_weights=False))
    torch.manual_seed(1)
    model = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(llama), config)
    model.save_pretrained(tmp_path / "adapter")
    assert main(["inspect", str(tmp_path / "adapter"), "--base", str(llama), "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert ("r^2 (Hadamard product" if method == "loha" else "rank(w1) x rank(w2)") in out
    assert "max rank" in out and "model.layers.1.self_attn.v_proj" in out
    saved = json.loads((tmp_path / "inspect.json").read_text())
    layers = {s["module"]: s for s in saved["layers"]}
    assert len(layers) == 4 and saved["forms"].keys() == {"LoHa" if method == "loha" else "LoKr"}
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        delta = q.get_delta_weight("default").double()
    W = q.base_layer.weight.detach().double()
    entry = layers["model.layers.0.self_attn.q_proj"]
    assert entry["relative_delta"] == pytest.approx(float(delta.norm() / W.norm()), rel=1e-5)
    assert entry["numerical_rank"] == entry["max_rank"] == (4 if method == "loha" else matrix_rank(delta))
    assert {p.name for p in tmp_path.glob("*.png")} == {"inspect_spectra.png", "inspect_relative_norms.png"}
    code = main(["inspect", str(tmp_path / "adapter"), "--compare", str(tmp_path / "adapter")])
    assert code == 1 and "--compare measures LoRA subspaces; it does not apply to a LO" in capsys.readouterr().err


def test_peftcores_own_loha_file_reads_as_pefts(llama, tmp_path):
    """The same factors saved by peftcore and by PEFT: the same report."""
    from peftcore import get_peft_model
    from peftcore.lycoris import LoHaConfig
    from peftcore.models import load_pretrained

    torch.manual_seed(2)
    theirs = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(llama),
                                 peft.LoHaConfig(target_modules=["o_proj"], r=3, init_weights=False))
    ours = get_peft_model(load_pretrained(llama), LoHaConfig(target_modules=["o_proj"], r=3))
    ours.load_state_dict(theirs.state_dict())  # the same keys, or this fails
    theirs.save_pretrained(tmp_path / "theirs")
    ours.save_pretrained(tmp_path / "ours")
    mine, reference = inspect_dense_adapter(tmp_path / "ours", llama), inspect_dense_adapter(tmp_path / "theirs", llama)
    assert [s.module for s in mine] == [s.module for s in reference] == [f"model.layers.{i}.self_attn.o_proj"
                                                                         for i in range(2)]
    for a, b in zip(mine, reference):
        assert a.delta_fro > 0 and (a.numerical_rank, a.max_rank) == (b.numerical_rank, 9)
        assert a.singular_values == pytest.approx(b.singular_values, rel=1e-9)
        assert a.relative_delta == pytest.approx(b.relative_delta, rel=1e-9)
