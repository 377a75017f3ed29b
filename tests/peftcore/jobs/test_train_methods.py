"""Every example recipe's method (DoRA, prompt tuning, P-tuning, prefix tuning) runs through
`peftcore train`, and its adapter folder loads back for `generate` and `eval` (on a tiny built-in)."""
import json
from pathlib import Path

import pytest

from tests.peftcore.jobs.test_train import FAST, run, tiny_builtin  # noqa: F401  (the autouse fixture applies here too)

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
PEFT_TYPES = {"support_dora.toml": "LORA", "support_prompt.toml": "PROMPT_TUNING",
              "support_ptuning.toml": "P_TUNING", "support_prefix.toml": "PREFIX_TUNING"}




@pytest.mark.parametrize("recipe", sorted(PEFT_TYPES))
def test_method_recipe_trains_and_its_adapter_loads_back(recipe, tmp_path):
    code, out, err = run("train", EXAMPLES / recipe, "--output-dir", tmp_path, "--max-steps", 2, *FAST,
                         "--set", "adapter.num_virtual_tokens=4" if recipe != "support_dora.toml" else "adapter.r=4")
    assert code == 0, err
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == PEFT_TYPES[recipe] and config["base_model_name_or_path"] == "builtin:tiny-llama"
    assert config.get("use_dora", False) == (recipe == "support_dora.toml")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["after"]["eval_loss"] > 0 and len(summary["samples"]) == 2
    code, out, err = run("generate", "--adapter", tmp_path / "adapter", "--max-new-tokens", 4, "Is there an SLA?")
    assert code == 0, err
    code, out, err = run("eval", "--adapter", tmp_path / "adapter", "--max-records", 2)
    assert code == 0, err
    assert "perplexity" in out


def test_merge_refuses_a_prompt_adapter_with_a_reason(tmp_path):
    code, _, err = run("train", EXAMPLES / "support_prefix.toml", "--output-dir", tmp_path, "--max-steps", 1, *FAST,
                       "--set", "eval.samples=0")
    assert code == 0, err
    code, _, err = run("merge", "--adapter", tmp_path / "adapter", "--output", tmp_path / "merged")
    assert code == 2 and "prompt-learning adapter: it adds inputs, not weights" in err


def test_adalora_recipe_prunes_ranks_on_schedule_and_saves_the_pruned_adapter(tmp_path):
    """total_step comes from the run (4 steps); the mask steps write the budget and ranks per layer to
    metrics.jsonl; the saved file holds only the triplets rank_pattern keeps, and loads back for eval."""
    code, out, err = run("train", EXAMPLES / "support_adalora.toml", "--output-dir", tmp_path, "--max-steps", 4,
                         *FAST, "--set", "adapter.tinit=0", "--set", "adapter.tfinal=1", "--set", "adapter.deltaT=1",
                         "--set", "adapter.init_r=4", "--set", "adapter.target_r=2", "--set", "eval.samples=0",
                         "--set", "train.eval_every=4")  # the adapter kept is then the last step's
    assert code == 0, err
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["total_step"] == 4
    kept = {key: sum(mask) for key, mask in config["rank_pattern"].items()}
    assert len(kept) == 4 and sum(kept.values()) == 2 * 4  # target_r per layer on average, over 2 blocks x q / v
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    masked = [r for r in records if "adalora_ranks" in r]
    assert [r["step"] for r in masked] == [2, 3, 4] and masked[-1]["adalora_budget"] == 8
    assert all(r["extra_loss"] > 0 for r in records if "loss" in r and "extra_loss" in r)
    from peftcore.models import safetensors_io
    saved = safetensors_io.iter_tensors(tmp_path / "adapter" / "adapter_model.safetensors")
    shapes = {k: tuple(t.shape) for k, t in saved}
    assert not any(k.endswith("ranknum") for k in shapes)
    for key, rank in kept.items():
        assert shapes[f"base_model.model.{key}"] == (rank, 1)
    code, out, err = run("eval", "--adapter", tmp_path / "adapter", "--max-records", 2)
    assert code == 0 and "perplexity" in out, err


def test_adalora_recipe_whose_schedule_does_not_fit_the_run_is_one_line(tmp_path):
    code, _, err = run("train", EXAMPLES / "support_adalora.toml", "--output-dir", tmp_path, "--max-steps", 2, *FAST)
    assert code == 2
    assert "[adapter] tinit = 20 and tfinal = 30 leave none of the run's 2 steps" in err


def test_qlora_loftq_recipe_trains_on_the_q_it_initialised_and_merges_into_it(tmp_path):
    """LoftQ's recipe path (dense load, LoftQ, then NF4): eval on the saved adapter rebuilds the same base; merge
    goes into the quantized weights by default and refuses the original ones (the correction would count twice)."""
    code, out, err = run("train", EXAMPLES / "support_qlora_loftq.toml", "--output-dir", tmp_path, "--max-steps", 2,
                         *FAST, "--set", "eval.samples=0")
    assert code == 0, err
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] == "loftq" and config["loftq_config"] == {"loftq_bits": 4, "loftq_iter": 1}
    after = json.loads((tmp_path / "summary.json").read_text())["after"]["eval_loss"]
    code, out, err = run("eval", "--adapter", tmp_path / "adapter", "--max-records", 2)
    assert code == 0, err
    code, out, err = run("merge", "--adapter", tmp_path / "adapter", "--output", tmp_path / "merged")
    assert code == 0 and (tmp_path / "merged" / "model.safetensors").is_file(), err
    assert "re-quantizing them would add a relative error of" in out + err
    code, _, err = run("merge", "--adapter", tmp_path / "adapter", "--output", tmp_path / "m2", "--into", "original")
    assert code == 2 and "is a LoftQ adapter" in err and after > 0
