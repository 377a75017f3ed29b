"""inspect's AdaLoRA report: ranks kept, |E|, ||dW|| and orthogonality against values the test sets itself, and
the rank history a run's metrics.jsonl holds."""
import json

import pytest
import torch

from peftcore import AdaLoraConfig, get_peft_model
from peftcore.analysis.adalora_ranks import format_rank_table, inspect_adalora_adapter, plot_rank_history, rank_history
from peftcore.models import load_pretrained

V0, V1 = "model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"


def orthonormal_adapter(base, folder, keep: dict[str, list[bool]]):
    """A and B with orthonormal rows / columns and E = 1, 2, 3, ...: dW's singular values are known exactly."""
    config = AdaLoraConfig(target_modules=["v_proj"], init_r=4, target_r=2, total_step=10, lora_alpha=8)
    model = get_peft_model(load_pretrained(base), config)
    with torch.no_grad():
        for layer in (model.base_model.model.get_submodule(m) for m in (V0, V1)):
            A, B, E = layer.lora_A["default"], layer.lora_B["default"], layer.lora_E["default"]
            A.copy_(torch.linalg.qr(torch.randn(A.shape[1], 4))[0].T)  # (4, in), orthonormal rows
            B.copy_(torch.linalg.qr(torch.randn(B.shape[0], 4))[0])  # (out, 4), orthonormal columns
            E.copy_(torch.arange(1.0, 5.0).view(4, 1))
    model.peft_config["default"].rank_pattern = {f"{m}.lora_E": k for m, k in keep.items()}
    model.save_pretrained(folder)
    return model


def test_ranks_values_and_norms_come_from_the_pruned_file(base, tmp_path):
    orthonormal_adapter(base, tmp_path, {V0: [True, False, True, True], V1: [False] * 4})
    stats = {s.module: s for s in inspect_adalora_adapter(tmp_path)}
    assert list(stats) == [V0, V1]
    s = stats[V0]
    assert (s.rank, s.init_r) == (3, 4) and s.singular_values == [4.0, 3.0, 1.0]
    scale = 8 / (4 + 1e-5)  # lora_alpha / ranknum, ranknum staying init_r
    assert s.delta_norm == pytest.approx(scale * (16 + 9 + 1) ** 0.5, rel=1e-5)  # orthonormal: ||dW|| = ||E||
    assert s.a_orthogonality < 1e-5 and s.b_orthogonality < 1e-5
    assert stats[V1].rank == 0 and stats[V1].delta_norm == 0.0 and stats[V1].singular_values == []
    table = format_rank_table(list(stats.values()))
    assert "3/4" in table and "0/4" in table and "2 layers: 3 of 8 triplets kept (mean rank 1.50)" in table


def test_orthogonality_residual_is_measured(base, tmp_path):
    model = orthonormal_adapter(base, tmp_path, {V0: [True] * 4, V1: [True] * 4})
    with torch.no_grad():
        model.base_model.model.get_submodule(V0).lora_A["default"].mul_(2.0)  # A A^T = 4 I: ||3 I||_F = 6
    model.save_pretrained(tmp_path)
    stats = {s.module: s for s in inspect_adalora_adapter(tmp_path)}
    assert stats[V0].a_orthogonality == pytest.approx(6.0, rel=1e-5) and stats[V1].a_orthogonality < 1e-5


def test_the_rank_history_is_read_from_the_run_and_drawn(base, tmp_path):
    run = tmp_path / "run"
    orthonormal_adapter(base, run / "adapter", {V0: [True] * 4, V1: [True, False, False, False]})
    records = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.9, "adalora_budget": 7, "adalora_ranks": {V0: 4, V1: 3}},
               {"step": 3, "loss": 1.8, "adalora_budget": 5, "adalora_ranks": {V0: 4, V1: 1}}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    history = rank_history(run / "adapter")
    assert history == [{"step": 2, "budget": 7, "ranks": {V0: 4, V1: 3}},
                       {"step": 3, "budget": 5, "ranks": {V0: 4, V1: 1}}]
    png = plot_rank_history(history, tmp_path / "ranks.png", inspect_adalora_adapter(run / "adapter"))
    assert png.stat().st_size > 1000
    assert rank_history(tmp_path / "elsewhere" / "adapter") == []


def test_another_method_is_refused_by_name(base, tmp_path):
    from peftcore import LoraConfig

    get_peft_model(load_pretrained(base), LoraConfig(target_modules=["v_proj"])).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="peft_type 'LORA'; this report reads ADALORA"):
        inspect_adalora_adapter(tmp_path)


def test_peftcore_inspect_reports_a_trained_adalora_run(base, tmp_path):
    """The CLI's report on a run folder: table, inspect.json with the history, the heatmap."""
    from peftcore.jobs.inspect import run_inspect

    run = tmp_path / "run"
    orthonormal_adapter(base, run / "adapter", {V0: [True, True, False, False], V1: [True] * 4})
    record = {"step": 4, "loss": 1.0, "adalora_budget": 6, "adalora_ranks": {V0: 2, V1: 4}}
    (run / "metrics.jsonl").write_text(json.dumps(record) + "\n")
    written = run_inspect(run / "adapter", output_dir=tmp_path / "out")
    assert sorted(p.name for p in written) == ["inspect.json", "inspect_adalora_ranks.png"]
    report = json.loads((tmp_path / "out" / "inspect.json").read_text())
    assert [(layer["module"], layer["rank"]) for layer in report["layers"]] == [(V0, 2), (V1, 4)]
    assert report["rank_history"] == [{"step": 4, "budget": 6, "ranks": {V0: 2, V1: 4}}]
