"""bench/bench_methods.py: one method's measurement (what each child process runs), in process, and the table."""
import pytest


@pytest.mark.slow
def test_two_methods_two_steps_give_finite_rows(load_bench):
    bench = load_bench("bench_methods")
    args = bench.parse_args(["--quick", "--methods", "lora,prompt", "--steps", "2"])
    assert (args.steps, args.eval_rows, args.methods) == (2, 8, ["lora", "prompt"])
    import peftcore.training.loop

    step = peftcore.training.loop.train_step
    results = [bench.measure_method(m, args) for m in args.methods]
    assert peftcore.training.loop.train_step is step  # the step timer put the library's function back
    for r in results:
        assert r["finite"] and r["steps"] == 2 and len(r["step_wall_s"]) == 2 and r["eval_rows"] == 8
        assert 0 < r["trainable"] < r["total"] and r["step_ms"] > 0 and r["weight_bytes"] > 0
        assert r["eval_after"]["eval_loss"] < r["eval_before"]["eval_loss"]  # two steps at these LRs already help
    lora, prompt = results
    assert lora["eval_before"] == prompt["eval_before"]  # the same base, the same held-out rows
    assert prompt["trainable"] == 20 * 128 and prompt["learning_rate"] == 3e-2 and lora["learning_rate"] == 1e-2
    table = bench.format_table({"methods": results + [{"method": "prefix", "error": "Traceback\nValueError: boom"}]})
    lines = table.splitlines()
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["lora", "prompt", "prefix"]
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    assert "failed: ValueError: boom" in lines[-1]
    for line, r in zip(lines[2:], results):
        assert f"{r['eval_before']['eval_loss']:.3f} -> {r['eval_after']['eval_loss']:.3f}" in line
        assert f"{r['trainable']:,} (" in line and "nan" not in line and "inf" not in line
