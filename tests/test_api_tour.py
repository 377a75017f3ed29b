"""examples/api_tour.py, the README's API tour, runs as written from start to end (issue 16).

The fast test runs it in a subprocess on a test-sized built-in model (the real tokenizer, tiny layers,
3 pre-training steps) passed as its checkpoint argument; the slow one runs it exactly as a reader
does, with no argument, which builds the real built-in model in an empty cache first (~30 s).
"""
import builtins
import dataclasses
import json
import os
import subprocess
import symtable
import sys
from pathlib import Path

import pytest
import torch

from peftcore.jobs import builtin

ROOT = Path(__file__).resolve().parents[1]
TOUR = ROOT / "examples" / "api_tour.py"
BEGIN, END = "# --- tour ---\n", "# --- end of tour ---\n"
SMALL = dataclasses.replace(builtin.BuiltinSpec(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, pretrain_steps=3, pretrain_batch_size=4,
                            pretrain_length=64)
# What each section prints, in order: a section that stopped printing (skipped, or cut) fails the test.
# ({layers}: the checkpoint's linear layers, heads aside.)
SECTIONS = ["base model: [", "trainable params: ", "support perplexity ", "mixed batch == per-adapter runs",
            "merged == unmerged logits", "trainable params: ", "merged {layers} quantized layers into dense weights",
            "2:4 pruning: 50% of the weights of {layers} layers are zero", "prefix-tuned output: (2, ",
            "intent logits (3, 6), span logits (3, ", "multi-task after 4 steps: intent accuracy ",
            "multi-task model saved and reloaded", "api tour: done"]


def tour_part() -> str:
    """The text between the markers: what the README's API tour block shows."""
    text = TOUR.read_text(encoding="utf-8")
    assert text.count(BEGIN) == 1 and text.count(END) == 1, "api_tour.py needs one pair of tour markers"
    return text.split(BEGIN, 1)[1].split(END, 1)[0]


def run_tour(*args: str, cwd: Path, env: dict, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOUR), *args], cwd=cwd, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=timeout)


def assert_every_section_ran(result: subprocess.CompletedProcess, layers: int) -> None:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    lines = result.stdout.splitlines()
    at = 0
    for fragment in (section.format(layers=layers) for section in SECTIONS):  # in order, each on a line of its own
        found = next((i for i in range(at, len(lines)) if lines[i].startswith(fragment)), None)
        assert found is not None, f"no line starting {fragment!r} after line {at}:\n{result.stdout}"
        at = found + 1


@pytest.fixture(scope="module")
def toured(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path, Path]:
    """(the finished run, its --workdir, the checkpoint it ran on); run from an empty folder."""
    base, workdir, cwd = (tmp_path_factory.mktemp(name) for name in ("base", "work", "cwd"))
    builtin.build(SMALL, base)
    result = run_tour(str(base), "--workdir", str(workdir), cwd=cwd,
                      env={"PEFTCORE_CACHE": str(tmp_path_factory.mktemp("cache"))}, timeout=300)
    assert not list(cwd.iterdir()), "the tour wrote into the folder it ran from"
    return result, workdir, base


def test_the_tour_runs_every_section_and_its_own_checks_pass(toured):
    result, _, _ = toured
    assert_every_section_ran(result, layers=2 * 7)  # exit code 0: every assert_close / assert in the script held
    assert "Traceback" not in result.stderr


def test_the_tour_writes_the_folders_it_says_it_writes(toured):
    _, workdir, _ = toured
    for adapter in ("adapter", "other-adapter", "mt"):
        assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (workdir / adapter).iterdir()}
    assert {"config.json", "model.safetensors"} <= {p.name for p in (workdir / "merged").iterdir()}
    heads = json.loads((workdir / "mt" / "task_heads.json").read_text())["tasks"]
    assert {task: spec["kind"] for task, spec in heads.items()} == \
        {"intent": "classification", "support": "generation", "span": "qa"}
    assert heads["span"]["weight"] == 0.5 and len(heads["intent"]["labels"]) == 6
    for run in ("run", "mt-run"):  # train() ran its 4 steps (and a final evaluation) both times
        records = [json.loads(line) for line in (workdir / run / "metrics.jsonl").read_text().splitlines()]
        assert max(r["step"] for r in records) == 4 and any("eval_loss" in r for r in records)
    mt_losses = next(r for r in records if r["step"] == 4)
    assert {"loss/intent", "loss/support", "loss/span"} <= set(mt_losses), mt_losses


def test_the_tour_adapter_under_hf_peft_gives_the_merged_model_transformers_loads(toured):
    """Outside the script's own checks: its adapter folder is HF PEFT's format, and the model it merged and
    saved loads in transformers with the logits PEFT computes with that adapter on the same base."""
    import peft
    import transformers

    _, workdir, base = toured
    hf_merged = transformers.AutoModelForCausalLM.from_pretrained(workdir / "merged").eval()
    hf_adapted = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base),
                                                workdir / "adapter").eval()
    ids = torch.tensor([[1, 5, 42, 300, 7, 99, 1000]])
    with torch.no_grad():
        adapted, merged = hf_adapted(ids).logits, hf_merged(ids).logits
        with hf_adapted.disable_adapter():
            plain = hf_adapted(ids).logits
    assert not torch.allclose(plain, merged, atol=1e-3), "the tour's adapter changes nothing: the check cannot fail"
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=2e-5)


def test_the_tour_part_reads_on_its_own():
    """The README shows only the part between the markers: every name it uses is imported or defined in it,
    except `checkpoint` (a path) and `workdir` (a folder), which the setup above the markers defines."""
    part = tour_part()
    assert part.lstrip().startswith("import "), "the tour part opens with its imports"
    assert max(len(line) for line in part.splitlines()) <= 120
    top = symtable.symtable(part, "tour", "exec")
    defined = {s.get_name() for s in top.get_symbols() if s.is_assigned() or s.is_imported()}
    known = defined | set(dir(builtins))
    tables, used = [top], set()
    while tables:
        table = tables.pop()
        tables += table.get_children()
        used |= {s.get_name() for s in table.get_symbols()
                 if s.is_referenced() and (table is top or s.is_global()) and s.get_name() not in known}
    assert used == {"checkpoint", "workdir"}


@pytest.mark.slow
def test_the_tour_runs_with_no_arguments_on_the_built_in_model(tmp_path):
    """As the README says to run it: the default checkpoint is the built-in tiny Llama, built here in an empty
    cache; the temporary folder the tour writes to is gone afterwards."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    result = run_tour(cwd=tmp_path, env={"PEFTCORE_CACHE": str(tmp_path / "cache"), "TMPDIR": str(scratch)},
                      timeout=600)
    assert_every_section_ran(result, layers=28)  # the real built-in model: 4 layers of 7 linears
    assert not list(scratch.glob("peftcore-tour-*")), "the tour left its temporary folder behind"
