"""The benchmark scripts run and print what they promise (small settings; the real figures are in docs/performance.md
 and docs/tpu.md)."""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.subprocess


@pytest.mark.tpu_compile
def test_memory_benchmark_searches_tpu_layouts_and_prints_a_table_and_json(tmp_path):
  pytest.importorskip("libtpu", reason="compiling for TPU slices needs libtpu (requirements-test.txt)")
  out = subprocess.run([sys.executable, "benchmarks/memory.py", "--config", "default", "--variants", "Ti/4",
                        "--topologies", "v5e:2x2", "--batch", "64", "--search", "--json", str(tmp_path / "m.json")],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "Ti/4" in out.stdout and "peak GiB" in out.stdout
  rows = json.loads((tmp_path / "m.json").read_text())
  # The search stops at the second layout that fits: replicated, then FSDP, which holds a quarter of the state.
  assert [r["param_sharding"] for r in rows] == ["replicated", "fsdp"] and all(r["fits"] for r in rows)
  assert rows[1]["state_gib"] == pytest.approx(rows[0]["state_gib"] / 4, rel=0.02)
  assert all(r["peak_gib"] < r["hbm_gib"] == 16 for r in rows)  # fits v5e's 16 GiB


@pytest.mark.peer
def test_throughput_benchmark_prints_ours_timm_and_the_ratio(tmp_path):
  out = subprocess.run([sys.executable, "benchmarks/throughput.py", "--variant", "Ti/4", "--resolution", "32",
                        "--batch", "8", "--device", "cpu", "--steps", "2", "--repeats", "2",
                        "--json", str(tmp_path / "t.json")], cwd=REPO, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads((tmp_path / "t.json").read_text())
  ours = result["ours"]
  for mode in ("train", "inference"):  # images/s is the batch over the median step time, which the range holds.
    timing = ours[mode]
    assert timing["images_per_s"] == pytest.approx(8 / (timing["step_ms_median"] / 1e3), rel=1e-9)
    assert timing["step_ms_min"] <= timing["step_ms_median"] <= timing["step_ms_max"]
  # The architecture's FLOPs agree with XLA's count of the compiled forward pass (CPU: no library calls).
  # XLA also counts the elementwise ops (LayerNorm, gelu, residuals): 2.8% more at Ti/4, 32px; B/16 at 224px 1%.
  assert 1.0 <= ours["xla_flops_per_image_forward"] / ours["flops_per_image_forward"] <= 1.04
  # MFU: the architecture's FLOPs (training 3x the forward pass) at the measured rate over the measured peak.
  peak = ours["peak_tflops_measured"] * 1e12
  assert ours["mfu_train"] == pytest.approx(3 * ours["flops_per_image_forward"] * ours["train"]["images_per_s"] / peak)
  assert ours["mfu_inference"] == pytest.approx(
      ours["flops_per_image_forward"] * ours["inference"]["images_per_s"] / peak)
  if "error" not in result["timm"]:  # timm is a test requirement; without it the ratio is absent.
    assert result["ratio_ours_over_timm"]["train"] == pytest.approx(
        ours["train"]["images_per_s"] / result["timm"]["train"]["images_per_s"])
    assert result["timm"]["model"] == "MlpMixer(patch_size=4, num_blocks=4, embed_dim=128)"


def test_input_pipeline_benchmark_reports_cores_to_feed(tmp_path):
  out = subprocess.run([sys.executable, "benchmarks/input_pipeline.py", "--images", "8", "--seconds", "1",
                        "--train_images_per_s", "1000", "--json", str(tmp_path / "p.json")],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = json.loads((tmp_path / "p.json").read_text())
  assert [r["pipeline"] for r in rows] == ["inception_crop+flip", "inception_crop+flip+randaugment"]
  for r in rows:
    assert r["cores_to_feed"] == pytest.approx(1000 / r["images_per_s_1_core"])


@pytest.mark.tpu_compile
def test_compile_time_benchmark_compiles_ours_and_big_vision_alternately(tmp_path):
  pytest.importorskip("libtpu", reason="compiling for TPU slices needs libtpu (requirements-test.txt)")
  out = subprocess.run([sys.executable, "benchmarks/compile_time.py", "--config", "default", "--variant", "Ti/4",
                        "--topology", "v3:2x2", "--per_device_batch", "1", "--repeats", "1",
                        "--json", str(tmp_path / "c.json")],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  ours, peer = json.loads((tmp_path / "c.json").read_text())["rows"]
  assert (ours["step"], peer["step"]) == ("ours", "big_vision")
  for row in (ours, peer):
    assert len(row["compile_s"]) == len(row["compile_cpu_s"]) == 1 and row["compile_s"][0] > 0
    assert row["median_compile_s"] == row["compile_s"][0]
    assert row["estimated_img_s_per_device"] == pytest.approx(1 / (row["estimated_ms"] / 1e3))
  ratio = ours["median_compile_s"] / peer["median_compile_s"]
  assert f"compile {ratio:.2f}x" in out.stdout
