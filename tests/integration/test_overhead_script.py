"""Smoke test of experiments/overhead.py (issue #6): tiny settings, keys and positive times only."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT

pytestmark = pytest.mark.slow  # a subprocess timing the overhead


def test_overhead_script_quick_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "overhead.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "experiments" / "overhead.py"),
            "--quick",
            "--output",
            str(out),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| config |" in proc.stdout
    result = json.loads(out.read_text())
    assert {"machine", "args", "trainer", "scaling"} <= result.keys()
    mlp = result["trainer"]["mlp"]
    assert mlp["params"] == 335_114
    for name in (
        "plain",
        "metagrad/task1",
        "metagrad/task2",
        "metagrad-anchored/task2",
        "si/task2",
    ):
        entry = mlp["configs"][name]
        assert entry["median_ms"] > 0 and entry["mean_ms"] > 0 and entry["steps_timed"] > 0
        assert entry["ratio_median"] > 0
        assert {"state", "workspace", "total"} <= entry["memory_floats_per_param"].keys()
    for name in ("metagrad/task2", "metagrad-anchored/task2"):  # the default holds its bases
        assert mlp["configs"][name]["memory_floats_per_param"]["state"] > 0
    (row,) = result["scaling"]
    assert row["params"] == 10_000
    methods = {"sgd-step", "metagrad-subspace/task2", "metagrad-anchored/task2"}
    assert methods | {"metagrad-paper/task2"} <= row["methods"].keys()
    assert all(m["median_ms"] > 0 for m in row["methods"].values())
