"""The benchmark harness works (tools/bench --quick). Asserts nothing about speed."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.libvirt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_quick_runs_and_checks_bytes(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench"), "--quick", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["byte_check"] == "ok"
    assert {"full", "log", "read", "cat"} <= result.keys()
