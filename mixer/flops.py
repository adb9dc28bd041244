"""How fast a run computes: the architecture's FLOPs per image, each accelerator's peak dense bf16 FLOP/s by
jax's device_kind, and from them TFLOP/s per device and MFU (model FLOPs utilisation) between two steps.

The FLOPs are the model's (Chowdhery et al. 2022, PaLM App. B): the matrix products of paper Table 1's
dimensions, 3x the forward pass for a train step. Not XLA's cost analysis of the compiled step, which counts a
while loop's body once (config.model.scan_blocks and config.grad_accum_steps > 1 give 1/N of the step), leaves
out library matmuls on GPU (docs/performance.md: 2.9 of 25.2 GFLOP per B/16 image) and counts remat's
recomputation; on CPU, without loops, it agrees with this count (tests/flops_test.py).
"""

import re
import time

# Peak dense bf16 FLOP/s of one jax device, matched in order on its lower-cased device_kind. The vendors'
# published figures (Google Cloud TPU system architecture; NVIDIA data sheets, dense = half the sparse figure).
# A TPU v2/v3 device is one TensorCore (half a chip); from v4 on, jax's device is the whole chip.
PEAK_BF16_FLOPS = (
    (r"^tpu v2$", 22.5e12),  # "TPU v2"
    (r"^tpu v3$", 61.5e12),  # "TPU v3": 123 TFLOP/s per chip of 2 devices
    (r"^tpu v4$", 275e12),  # "TPU v4" (not "TPU v4 lite", the inference chip)
    (r"^tpu v5 ?(lite|e)$", 197e12),  # "TPU v5 lite" (v5e)
    (r"^tpu v5p?$", 459e12),  # "TPU v5" (v5p)
    (r"^tpu v6 ?(lite|e)$", 918e12),  # "TPU v6 lite" (v6e)
    (r"\bh100\b.*\bpcie\b", 756e12),  # "NVIDIA H100 PCIe"
    (r"\bh[12]00\b.*\bnvl\b", 835e12),  # "NVIDIA H100 NVL", "NVIDIA H200 NVL"
    (r"\bh[12]00\b", 989e12),  # SXM: "NVIDIA H100 80GB HBM3", "NVIDIA H200"
    (r"\ba100\b", 312e12),  # "NVIDIA A100-SXM4-80GB", "NVIDIA A100-PCIE-40GB", "NVIDIA A100 80GB PCIe"
)


def peak_flops(device_kind: str) -> float | None:
  """Peak dense bf16 FLOP/s of a device of this kind (jax.Device.device_kind); None for one not in the table."""
  kind = " ".join(device_kind.lower().split())
  return next((peak for pattern, peak in PEAK_BF16_FLOPS if re.search(pattern, kind)), None)


def forward_flops_per_image(model, image_shape: tuple[int, ...]) -> float:
  """Forward FLOPs (2 per multiply-add) of the matrix products for one image: stem, token and channel MLPs of
  every block, head. `model` is an MlpMixer (or anything with its dimension fields)."""
  height, width, channels = image_shape
  p, c = model.patch_size, model.hidden_dim
  tokens = (height // p) * (width // p)
  stem = 2 * tokens * p * p * channels * c
  block = 2 * (2 * c * tokens * model.tokens_mlp_dim) + 2 * (2 * tokens * c * model.channels_mlp_dim)
  return float(stem + model.num_blocks * block + 2 * c * (model.num_classes or 0))


def train_flops_per_image(model, image_shape: tuple[int, ...]) -> float:
  """A train step's FLOPs per image: the forward pass and a backward pass of twice its cost."""
  return 3 * forward_flops_per_image(model, image_shape)


def format_rate(tflops: float, mfu: float | None) -> str:
  """"312 TFLOP/s per device (32% MFU)", or without MFU where the device's peak is unknown."""
  rate = f"{tflops:.3g} TFLOP/s per device"
  return rate if mfu is None else f"{rate} ({100 * mfu:.0f}% MFU)"


class Utilization:
  """TFLOP/s per device and MFU over the steps between two calls of update(step): call it once the step's
  results are on the host (after a device sync), so that the interval holds exactly those steps."""

  def __init__(self, flops_per_step_per_device: float, peak: float | None, clock=time.monotonic):
    self.flops, self.peak, self.clock = flops_per_step_per_device, peak, clock
    self._last = None  # (time, step) of the previous update

  def restart(self, step: int) -> None:
    """Counts from now, at `step`: after work that is not training (an evaluation), once its results are in."""
    self._last = (self.clock(), step)

  def update(self, step: int) -> dict[str, float]:
    """{"tflops_per_device", "mfu" (where the peak is known)} since the previous update; {} at the first."""
    now, last = self.clock(), self._last
    self._last = (now, step)
    if last is None or step <= last[1] or now <= last[0]:
      return {}
    achieved = self.flops * (step - last[1]) / (now - last[0])
    return {"tflops_per_device": achieved / 1e12, **({"mfu": achieved / self.peak} if self.peak else {})}
