"""experiments/convergence.py, the one command behind docs/convergence.md, still runs and writes both files."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_convergence_script_writes_table_and_plot(tmp_path):
    cmd = [
        sys.executable,
        str(REPO / "experiments" / "convergence.py"),
        "--grid",
        "8",
        "--max-steps",
        "16",
        "--ref-steps",
        "32",
        "--samplers",
        "euler",
        "heun",
        "--out",
        str(tmp_path),
        "--raw",
        str(tmp_path / "raw.pt"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (tmp_path / "convergence.md").read_text()
    assert "experiments/convergence.py" in md.splitlines()[2]  # the command is stated at the top
    for row in ("| uniform | euler | 4 |", "| gaussian | heun | 16 |", "## Classifier guidance against the exact"):
        assert row in md
    png = (tmp_path / "convergence.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    # --replot redraws from the saved numbers, without sampling, to the same table
    (tmp_path / "convergence.md").unlink()
    proc = subprocess.run(cmd + ["--replot"], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "convergence.md").read_text() == md
