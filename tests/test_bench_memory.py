"""The memory benchmark runs each variant in its own process and reports what it measured."""
from __future__ import annotations


def test_every_variant_runs_a_step_and_reports_its_peak(tiny_model_dir, data_dir):
    from rpo_app.bench.memory import VARIANTS, format_table, run_benchmark

    result = run_benchmark(data_dir, model=str(tiny_model_dir), seqs=3, length=40)
    rows = result["rows"]
    assert [r["variant"] for r in rows] == [v[0] for v in VARIANTS]
    for r in rows:
        assert r["tokens"] <= r["padded_tokens"] == 3 * 40
        assert r["step_s"] > 0 and r["loaded_gb"] > 0 and r["peak_above_loaded_gb"] >= 0
    table = format_table(result)
    assert "before" in table and table.count("\n| ") == len(VARIANTS) + 2  # header, rule, rows
