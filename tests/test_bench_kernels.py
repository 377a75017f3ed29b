"""The kernel benchmarks: bench/bench_kernels.py runs on CPU (--quick --repeats 1) and its dry run
enumerates the CUDA grid; each per-kernel script (bench_quant_matmul.py, bench_lora_matmul.py,
bench_qlora.py) runs on its own; the harness picks rooflines, the CLI reads --shapes."""
import json

import pytest


@pytest.fixture
def load(load_bench):
    return load_bench


@pytest.mark.slow
def test_cpu_quick_run_writes_every_row(load, tmp_path, capsys):
    """The CPU path CI can run: in-process (imports shared with the rest of the suite), ~5 s of timing."""
    out = tmp_path / "kernels.json"
    load("bench_kernels").main(["--device", "cpu", "--quick", "--repeats", "1", "--warmup", "0", "--out", str(out)])
    stdout = capsys.readouterr().out
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert result["env"]["device"] == "cpu" and not result["dry_run"]
    keys = {(r["section"], r.get("M"), r.get("r")) for r in rows}
    assert keys == ({("a", m, None) for m in (1, 16, 256)} | {(s, m, 16) for s in "bc" for m in (1, 16, 256)}
                    | {("d", None, 16)})
    expected = {"a": {"ours_nf4", "ours_int4", "dense", "ref_nf4", "ref_int4", "bnb_matmul_4bit", "bnb_dequant_mm"},
                "b": {"ours", "unfused", "ref", "base"}, "c": {"ours", "ref", "dense_base", "bnb_peft"},
                "d": {"ours", "hf_peft_bnb"}}
    for row in rows:
        assert not row["errors"], row["errors"]
        assert set(row["contenders"]) == expected[row["section"]]
        assert all(c["median_ms"] > 0 and c["tflops"] > 0 and c["gbps"] > 0 for c in row["contenders"].values())
        assert row["ratios"] and all(v > 0 for v in row["ratios"].values())
        assert not row["check_failed"], row["check_failed"]  # ours, bnb and the references compute the same thing
    assert "### a. 4-bit forward" in stdout and "### d. QLoRA training step" in stdout
    assert "all agree within tolerance" in stdout


def test_dry_run_enumerates_the_cuda_grid(load, tmp_path, capsys):
    bench = load("bench_kernels")
    result = bench.main(["--dry-run", "--gpu", "NVIDIA H100 80GB HBM3", "--out", str(tmp_path / "dry.json")])
    rows = result["rows"]
    counts = {s: sum(r["section"] == s for r in rows) for s in "abcd"}
    assert counts == {"a": 2 * 6, "b": 2 * 6 * 2, "c": 2 * 6 * 2, "d": 1}
    gemv = next(r for r in rows if r["section"] == "a" and r["K"] == 8192 and r["M"] == 1)["contenders"]["ours_nf4"]
    # packed 8192^2 / 2 + absmax 8192^2 / 64 * 4 + x + y (bf16): the bytes of the 4-bit GEMV
    assert gemv["bytes"] == 8192 * 8192 / 2 + 8192 * 8192 / 16 + 2 * 8192 * 2
    assert gemv["roofline_ms"] == pytest.approx(gemv["bytes"] / 3.35e12 * 1e3)
    assert "75% HBM" in capsys.readouterr().out


def test_roofline_is_picked_by_device_name(load):
    bench, cli = load("kernel_harness"), load("kernel_cli")
    assert bench.pick_roofline("NVIDIA H100 80GB HBM3")["hbm_tbps"] == 3.35
    assert bench.pick_roofline("NVIDIA H100 PCIe")["label"] == "H100 PCIe"
    assert bench.pick_roofline("NVIDIA H200")["hbm_tbps"] == 4.8
    assert bench.pick_roofline("NVIDIA A100-SXM4-80GB")["tflops_16"] == 312.0
    assert bench.pick_roofline("cpu") is None
    assert cli.parse_shapes("K=N=8192;m=1,16", cli.GRIDS["cuda"]) == {"kn": [8192], "m": [1, 16], "r": [16, 64]}


@pytest.mark.parametrize("script, counts", [("bench_quant_matmul", {"a": 12}), ("bench_lora_matmul", {"b": 24}),
                                            ("bench_qlora", {"c": 24, "d": 1})])
def test_each_script_dry_runs_its_sections(load, tmp_path, capsys, script, counts):
    """Each per-kernel script enumerates only its own sections, with the driver's figures."""
    rows = load(script).main(["--dry-run", "--gpu", "H100", "--out", str(tmp_path / "dry.json")])["rows"]
    assert {s: sum(r["section"] == s for r in rows) for s in counts} == counts and len(rows) == sum(counts.values())
    driver = load("bench_kernels").main(["--dry-run", "--gpu", "H100", "--sections", ",".join(counts),
                                         "--out", str(tmp_path / "driver.json")])["rows"]
    assert rows == driver
    assert f"### {next(iter(counts))}." in capsys.readouterr().out


@pytest.mark.parametrize("script, argv, sections", [
    ("bench_quant_matmul", [], {"a"}),
    ("bench_lora_matmul", [], {"b"}),
    ("bench_qlora", ["--sections", "c"], {"c"}),
    ("bench_gguf_matmul", [], {"g"}),
])
def test_each_script_times_a_tiny_grid_on_cpu(load, tmp_path, script, argv, sections):
    """One tiny CPU case per script: every contender runs and agrees with its reference."""
    out = tmp_path / "run.json"
    result = load(script).main(["--device", "cpu", "--shapes", "kn=128;m=4;r=4", "--repeats", "1", "--warmup", "0",
                                "--out", str(out), *argv])
    assert json.loads(out.read_text())["rows"] == result["rows"]
    assert {r["section"] for r in result["rows"]} == sections
    for row in result["rows"]:
        assert not row["errors"] and not row["check_failed"] and row["contenders"] and row["ratios"]


def test_sections_flag_rejects_other_scripts_sections(load):
    with pytest.raises(SystemExit, match="unknown"):
        load("bench_qlora").main(["--dry-run", "--sections", "a"])
