"""experiments/ablation.py at a toy budget: every row is produced, the table and plot are written."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_ablation_script_writes_table_and_plot(tmp_path):
    out = tmp_path / "ablation.md"
    cmd = [
        sys.executable,
        str(REPO / "experiments" / "ablation.py"),
        "--steps",
        "3",
        "--warmup",
        "1",
        "--samples",
        "4",
        "--sample-steps",
        "2",
        "--jobs",
        "2",
        "--only",
        "default",
        "dog",
        "--runs",
        str(tmp_path / "runs"),
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    assert "experiments/ablation.py --steps 3" in text  # the command that made the table is at its top
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| row")]
    names = [r.split("|")[1].strip() for r in rows]
    assert names == ["default", "dog", "real vs real", "untrained model", "nearest-training-clip copies"]
    assert rows[1].count("—") < 3  # the DoG row was trained and has numbers
    copies = rows[4].split("|")
    assert copies[-3].strip() == "100%"  # every copy is within the pixel-copy threshold of a training clip
    assert out.with_suffix(".png").stat().st_size > 1000
