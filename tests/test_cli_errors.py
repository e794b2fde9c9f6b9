"""A bad input to any console command ends with one line `stale-X: error: <what, naming it>` and exit code 2, no
traceback (stale/cli/__init__.py); HYDRA_FULL_ERROR=1 brings the traceback back."""

import pytest

from helpers import run_cli

BAD_INPUTS = [  # (command line, what the one line must name)
    (["stale-train", "model.dim=7", "debug=smoke"], "model.dim=7"),
    (["stale-sample", "ckpt=/nonexistent/last.ckpt", "out=OUT"], "/nonexistent/last.ckpt"),
    (["stale-export", "ckpt=/nonexistent/last.ckpt", "out=OUT"], "/nonexistent/last.ckpt"),
    (["stale-shards", "out=OUT"], "input="),
    (
        ["stale-encode", "input=/nonexistent.tar", "out=OUT", "vae.pretrained=/nonexistent", "frames=9", "size=64"],
        "/nonexistent",
    ),
    (["stale-eval", "samples=/nonexistent", "real=/nonexistent.tar"], "/nonexistent"),
    (["stale-contamination", "train=/nonexistent.tar", "test=/other.tar", "out=OUT/c.json"], "/nonexistent.tar"),
    (["stale-bench", "sections=nope", "out=OUT/b.json"], "nope"),
]


@pytest.mark.parametrize("argv, named", BAD_INPUTS, ids=[a[0] for a, _ in BAD_INPUTS])
def test_a_bad_input_is_one_line_and_exit_code_2(argv, named, tmp_path):
    argv = [a.replace("OUT", str(tmp_path / "out")) for a in argv]
    if argv[0] == "stale-train":  # its outputs under the test's folder
        argv.append(f"hydra.run.dir={tmp_path / 'run'}")
    proc = run_cli(*argv, check=False, timeout=180)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith(f"{argv[0]}: error: ")]
    assert named in line, line


def test_hydra_full_error_keeps_the_traceback(tmp_path):
    proc = run_cli(
        "stale-export",
        "ckpt=/nonexistent/last.ckpt",
        f"out={tmp_path}",
        check=False,
        timeout=120,
        env={"HYDRA_FULL_ERROR": "1"},
    )
    assert proc.returncode != 0 and "Traceback" in proc.stderr
