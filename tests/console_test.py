"""Tests for mixer/console.py: the header and the timed progress line."""

from mixer import console


def test_progress_reports_every_few_seconds_with_speed_and_eta():
  now = [100.0]
  progress = console.Progress(total_steps=100, batch_size=32, every_s=5.0, clock=lambda: now[0])
  assert progress.due(1)  # the first report comes at once: it starts the clock
  first = progress.line(10, {"loss": 2.0, "accuracy": 0.25})
  assert first == "step 10/100  loss 2.0000  train acc 0.250"  # no speed yet: compilation would distort it
  now[0] += 4.0
  assert not progress.due(20)
  now[0] += 1.0
  assert progress.due(20)
  assert progress.line(20, {"loss": 1.5}) == "step 20/100  loss 1.5000  64 img/s  ETA 40s"  # 0.5 s per step
  assert progress.due(100)  # the last step always


def test_progress_shows_tflops_per_device_and_mfu_where_the_peak_is_known():
  now = [0.0]
  progress = console.Progress(100, 32, every_s=5.0, clock=lambda: now[0], flops_per_image=1e12, peak=128e12)
  progress.line(10, {"loss": 2.0})
  now[0] += 5.0
  line = progress.line(20, {"loss": 1.5})
  assert line == "step 20/100  loss 1.5000  64 img/s  64 TFLOP/s per device (50% MFU)  ETA 40s"
  progress.peak = None  # a device kind that mixer/flops.py does not know: no MFU
  now[0] += 5.0
  assert progress.line(30, {"loss": 1.5}).endswith("64 img/s  64 TFLOP/s per device  ETA 35s")


def test_header_names_model_mesh_data_and_length():
  text = console.header("Ti/4", 540_000, {"data": 8, "model": 1}, "digits", 1438, 359, 10, (16, 16, 1), 449, 128, 0)
  assert text.splitlines() == ["Model Ti/4: 0.54M parameters on a 8 data x 1 model mesh",
                               "Data digits: 1438 train / 359 eval images, 10 classes, 16x16x1 input",
                               "Training 449 steps of batch 128 (40.0 epochs)"]
