"""inspect's report on trained token rows (trainable_token_indices): each row's change from the base table,
against the change the test made itself."""
import json

import pytest
import torch
import transformers

from peftcore import LoraConfig, get_peft_model
from peftcore.analysis.token_rows import format_token_table, inspect_token_rows
from peftcore.jobs.inspect import run_inspect
from peftcore.models import load_pretrained
from tests.peftcore.lora.test_vs_peft import LLAMA

ROWS = [5, 9]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A base and an adapter whose rows moved by a known step: row i by (i + 1) * e_i."""
    torch.manual_seed(0)
    base = tmp_path_factory.mktemp("base")
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).save_pretrained(base)
    model = get_peft_model(load_pretrained(base), LoraConfig(target_modules=["q_proj"], trainable_token_indices=ROWS))
    rows = model.get_base_model().model.embed_tokens.token_adapter.trainable_tokens_delta["default"]
    step = torch.zeros_like(rows)
    step[0, 0], step[1, 1] = 1.0, 2.0
    with torch.no_grad():
        rows.add_(step)
    adapter = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(adapter)
    return base, adapter, rows.detach().clone(), step


def config(adapter):
    return json.loads((adapter / "adapter_config.json").read_text())


def test_each_rows_change_is_the_step_it_took(trained):
    base, adapter, rows, step = trained
    stats = inspect_token_rows(adapter, config(adapter), base)
    assert [(s.module, s.token) for s in stats] == [("model.embed_tokens", t) for t in ROWS]
    rows, step = rows.double(), step.double()
    before = rows - step
    for s, row, start, moved in zip(stats, rows, before, step):
        assert s.change == pytest.approx(float(moved.norm()), rel=1e-6)
        assert s.relative_change == pytest.approx(float(moved.norm() / start.norm()), rel=1e-6)
        assert s.cosine_to_base == pytest.approx(float(torch.cosine_similarity(row, start, dim=0)), abs=1e-6)
        assert s.norm == pytest.approx(float(row.norm()), rel=1e-6)


def test_without_a_base_only_the_norms_and_an_adapter_without_rows_has_none(trained, tmp_path):
    base, adapter, rows, _ = trained
    stats = inspect_token_rows(adapter, config(adapter))
    assert [s.change for s in stats] == [None, None]
    assert "-" in format_token_table(stats)
    plain = get_peft_model(load_pretrained(base), LoraConfig(target_modules=["q_proj"]))
    plain.save_pretrained(tmp_path)
    assert inspect_token_rows(tmp_path, config(tmp_path), base) == []


def test_peftcore_inspect_reports_the_rows(trained, tmp_path):
    base, adapter, _, step = trained
    run_inspect(adapter, base=str(base), output_dir=tmp_path)
    report = json.loads((tmp_path / "inspect.json").read_text())
    assert [r["token"] for r in report["token_rows"]] == ROWS
    assert report["token_rows"][1]["change"] == pytest.approx(2.0, rel=1e-6)


def test_an_embedding_lora_is_inspected_as_its_tables_delta(trained, tmp_path):
    """lora_embedding_A / _B: the report's spectrum is that of the (vocab, dim) delta the layer adds."""
    from peftcore.analysis.lowrank import inspect_adapter

    base, _, _, _ = trained
    model = get_peft_model(load_pretrained(base), LoraConfig(target_modules=["embed_tokens", "q_proj"], r=3,
                                                             init_lora_weights="gaussian"))
    layer = model.get_base_model().model.embed_tokens
    with torch.no_grad():
        layer.lora_embedding_A["default"].normal_()
        layer.lora_embedding_B["default"].normal_()
        expected = torch.linalg.svdvals(layer.delta_weight("default").double())
    model.save_pretrained(tmp_path)
    stats = {s.module: s for s in inspect_adapter(tmp_path, base)}
    embedding = stats["model.embed_tokens"]
    assert embedding.rank == 3 and embedding.relative_delta is not None
    assert torch.allclose(torch.tensor(embedding.singular_values[:3], dtype=torch.float64), expected[:3], rtol=1e-5)
