"""inspect's report for IA3 / VeRA / OFT adapters: figures against values the test set itself."""
import json
import math

import pytest
import torch

from peftcore import get_peft_model
from peftcore.analysis.method_vectors import format_vector_table, inspect_method_adapter
from peftcore.ia3 import IA3Config
from peftcore.jobs.inspect import run_inspect
from peftcore.models import load_pretrained
from peftcore.oft import OFTConfig
from peftcore.vera import VeraConfig


def saved(base, tmp_path, config, fill):
    model = get_peft_model(load_pretrained(base), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                fill(name, p)
    model.save_pretrained(tmp_path)
    return {s.module: s.figures for s in inspect_method_adapter(tmp_path)}


def test_ia3_vectors_report_their_distance_from_ones(base, tmp_path):
    ramp = lambda _, p: p.copy_(torch.linspace(0.5, 1.5, p.numel()).view_as(p))  # noqa: E731
    figures = saved(base, tmp_path, IA3Config(target_modules=["v_proj"], feedforward_modules=[]), ramp)
    assert list(figures) == ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"]
    v = torch.linspace(0.5, 1.5, 16, dtype=torch.float64)  # v_proj: 2 kv heads x 8 = 16 outputs
    f = figures["model.layers.0.self_attn.v_proj"]
    assert (f["l min"], f["l max"]) == pytest.approx((0.5, 1.5))
    assert f["l mean"] == pytest.approx(1.0) and f["l rms-1"] == pytest.approx(float((v - 1).square().mean().sqrt()))
    report = tmp_path / "out"
    run_inspect(tmp_path, output_dir=report)
    assert json.loads((report / "inspect.json").read_text())["layers"][0]["figures"]["l max"] == pytest.approx(1.5)


def test_vera_reports_both_scaling_vectors(base, tmp_path):
    fill = lambda name, p: p.fill_(0.25 if "lambda_b" in name else -2.0)  # noqa: E731
    figures = saved(base, tmp_path, VeraConfig(target_modules=["q_proj"], r=4), fill)
    f = figures["model.layers.1.self_attn.q_proj"]
    assert (f["lambda_b mean"], f["lambda_b rms-0"], f["lambda_d min"]) == pytest.approx((0.25, 0.25, -2.0))
    table = format_vector_table(inspect_method_adapter(tmp_path))
    assert "lambda_b mean" in table and "model.layers.1.self_attn.q_proj" in table


@pytest.mark.parametrize("degrees", [0.0, 30.0, 100.0])
def test_oft_reports_the_angle_of_a_known_rotation(base, tmp_path, degrees):
    """Blocks of 2 under the exact Cayley transform: the vector tan(theta / 2) turns its plane by theta."""
    config = OFTConfig(target_modules=["q_proj"], r=0, oft_block_size=2, use_cayley_neumann=False)
    angle = lambda _, p: p.fill_(math.tan(math.radians(degrees) / 2))  # noqa: E731
    f = saved(base, tmp_path, config, angle)["model.layers.0.self_attn.q_proj"]
    assert (f["blocks"], f["block size"]) == (16, 2)
    assert f["max angle deg"] == pytest.approx(degrees, abs=1e-4)
    assert f["median block angle deg"] == pytest.approx(degrees, abs=1e-4)


def test_other_methods_are_refused_plainly(tmp_path):
    """A peft_type no report reads (LoHa / LoKr have theirs now: analysis/test_dense_delta.py)."""
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "FOURIERFT"}))
    with pytest.raises(ValueError, match="holds a FOURIERFT adapter: peftcore inspect reads LoRA / DoRA, AdaLoRA, "):
        run_inspect(tmp_path, output_dir=tmp_path / "out")
