"""Tests for mixer/flops.py: the device kinds' peaks, the architecture's FLOPs, TFLOP/s and MFU over an interval."""

import pytest

from mixer import flops, models


def test_device_kinds_as_jax_spells_them_find_their_peak():
  expected = {"TPU v3": 61.5e12, "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5": 459e12,
              "TPU v5p": 459e12, "TPU v6 lite": 918e12, "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12,
              "NVIDIA H200": 989e12, "NVIDIA H200 NVL": 835e12, "NVIDIA A100-SXM4-80GB": 312e12,
              "NVIDIA A100-PCIE-40GB": 312e12, "NVIDIA A100 80GB PCIe": 312e12, " tpu  V4 ": 275e12}
  assert {kind: flops.peak_flops(kind) for kind in expected} == expected
  for unknown in ("TPU v4 lite", "TPU7x", "NVIDIA GH200 480GB", "cpu", "TFRT_CPU_0"):  # no MFU, rather than a wrong one
    assert flops.peak_flops(unknown) is None, unknown


def test_architecture_flops_follow_table_1():
  b16 = models.MlpMixer(num_classes=1000, **models.variant_kwargs("B/16"))
  # 196 tokens of 768 channels; D_S 384, D_C 3072, 12 blocks (paper Table 1): 25.2 GFLOP forward per 224px image,
  # which XLA's count of the compiled CPU program matched to 1% (docs/performance.md).
  stem, block, head = 2 * 196 * 768 * 768, 2 * 2 * 768 * 196 * 384 + 2 * 2 * 196 * 768 * 3072, 2 * 768 * 1000
  assert flops.forward_flops_per_image(b16, (224, 224, 3)) == stem + 12 * block + head
  assert flops.forward_flops_per_image(b16, (224, 224, 3)) == pytest.approx(25.2e9, rel=0.001)
  assert flops.train_flops_per_image(b16, (224, 224, 3)) == 3 * flops.forward_flops_per_image(b16, (224, 224, 3))


def test_utilization_counts_the_steps_between_fetches_and_restarts_after_an_evaluation():
  now = [0.0]
  meter = flops.Utilization(flops_per_step_per_device=2e12, peak=8e12, clock=lambda: now[0])
  assert meter.update(10) == {}  # the first fetch starts the clock (the steps before it include compilation)
  now[0] = 5.0
  assert meter.update(20) == pytest.approx({"tflops_per_device": 4.0, "mfu": 0.5})  # 10 steps of 2 TFLOP in 5 s
  now[0] = 60.0  # an evaluation at step 20 took 55 s
  meter.restart(20)
  now[0] = 62.0
  assert meter.update(22) == pytest.approx({"tflops_per_device": 2.0, "mfu": 0.25})
  now[0] = 63.0
  assert flops.Utilization(1e12, None, clock=lambda: now[0]).update(1) == {}
  assert flops.format_rate(312.4, 0.316) == "312 TFLOP/s per device (32% MFU)"
  assert flops.format_rate(0.0123, None) == "0.0123 TFLOP/s per device"
