"""The benchmark scripts run and print what they promise (small settings; the real figures are in README)."""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def test_memory_benchmark_prints_a_table_and_json(tmp_path):
  out = subprocess.run([sys.executable, "benchmarks/memory.py", "--devices", "4", "--batch", "16", "--variants",
                        "S/32", "--param_sharding", "fsdp", "--json", str(tmp_path / "m.json")],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "S/32" in out.stdout and "peak GiB" in out.stdout
  (row,) = json.loads((tmp_path / "m.json").read_text())
  assert row["mesh"] == {"data": 4, "model": 1} and row["param_sharding"] == "fsdp"
  # S/32 with a 21k head: ~30M params; FSDP splits params and the two Adam moments 4 ways.
  full_state_gib = row["params_m"] * 1e6 * 4 * 3 / 2**30
  assert row["arguments_gib"] < 0.5 * full_state_gib
  assert row["peak_gib"] > row["arguments_gib"] > 0
