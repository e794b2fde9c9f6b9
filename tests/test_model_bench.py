"""stale.bench.attention: the alternating-vs-full benchmark returns complete, consistent rows."""

import pytest

from stale.bench.attention import run, to_markdown


def test_attention_benchmark_rows():
    rows = run(
        frames=(2, 4),
        image=8,
        patch=(1, 4, 4),
        model_overrides=dict(dim=16, depth=2, heads=2),
        batch=1,
        steps=1,
        warmup=0,
        device="cpu",
        threads=1,
        isolate=False,
    )
    assert [(r["frames"], r["pattern"]) for r in rows] == [
        (2, "alternating"),
        (2, "full"),
        (4, "alternating"),
        (4, "full"),
    ]
    for r in rows:
        assert "error" not in r, r
        assert r["tokens"] == r["frames"] * (2 * 2 + 1)
    alt, full = rows[2], rows[3]
    # the ratios are relative to the right rows: the alternating row of the same T, the shortest clip of the pattern
    assert alt["time_vs_alternating"] == 1.0 and rows[0]["time_vs_shortest"] == 1.0
    assert full["time_vs_alternating"] == pytest.approx(full["step_s"] / alt["step_s"], rel=1e-2)
    assert full["train_gflop_per_clip"] > alt["train_gflop_per_clip"]  # same weights, more attention work
    assert alt["params"] == full["params"]
    table = to_markdown(rows)
    assert table.count("\n") == len(rows) + 1 and "| 4 | full |" in table
