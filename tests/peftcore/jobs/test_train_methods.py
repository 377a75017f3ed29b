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
