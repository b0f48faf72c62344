"""bench/gpu_check.py on a machine without a GPU (as CI is): it says so and exits 0, having run nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_without_a_gpu_it_says_so_and_exits_0(tmp_path: Path) -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TMPDIR": str(tmp_path)}  # no GPU, whatever the machine has
    done = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("gpu_check: no GPU to check: torch ")
    assert "Nothing was run." in done.stdout
    assert not list(tmp_path.iterdir()), "it wrote files"
