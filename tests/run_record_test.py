"""The run's record: what a resume may change, what it records, and what is refused."""

import json

import pytest

from configs import default
from mixer import run_record
from tests.conftest import override

DIGITS = {"class_names": [str(i) for i in range(10)], "label_subset": "", "splits": {"test": 359, "train": 1438},
          "tfds_name": "digits/1.0.0"}


def _config(**values):
  return override(default.get_config(), **values)


def test_a_new_run_records_its_config_and_dataset(tmp_path):
  run_record.start(_config(lr=0.01), str(tmp_path), DIGITS, step=None)
  assert json.loads((tmp_path / "config.json").read_text())["lr"] == 0.01
  assert json.loads((tmp_path / "dataset.json").read_text()) == DIGITS
  assert run_record.class_names(str(tmp_path)) == DIGITS["class_names"]
  assert run_record.changes(str(tmp_path)) == []


def test_a_resume_with_changed_keys_is_refused_listing_each_and_writes_nothing(tmp_path):
  run_record.start(_config(), str(tmp_path), DIGITS, step=None)
  before = {p.name: p.read_text() for p in tmp_path.iterdir()}
  with pytest.raises(run_record.RunChangedError) as error:
    run_record.start(_config(lr=0.01, batch_size=64, **{"optim.b2": 0.99}), str(tmp_path), DIGITS, step=7)
  message = str(error.value)
  for expected in ("at step 7", "lr: 0.003 -> 0.01", "batch_size: 128 -> 64", "optim.b2: 0.999 -> 0.99",
                   "--config.allow_changes=batch_size,lr,optim.b2"):
    assert expected in message, message
  assert {p.name: p.read_text() for p in tmp_path.iterdir()} == before


def test_allowed_changes_are_appended_with_their_step_and_the_record_is_not_rewritten(tmp_path):
  run_record.start(_config(), str(tmp_path), DIGITS, step=None)
  config_json = (tmp_path / "config.json").read_text()
  run_record.start(_config(lr=0.01, allow_changes="lr"), str(tmp_path), DIGITS, step=7)
  # A sub-config's name allows its keys; the earlier change is now part of the run's config.
  run_record.start(_config(lr=0.01, allow_changes="optim", **{"optim.b1": 0.8}), str(tmp_path), DIGITS, step=9)
  assert run_record.changes(str(tmp_path)) == [{"step": 7, "key": "lr", "old": 0.003, "new": 0.01},
                                               {"step": 9, "key": "optim.b1", "old": 0.9, "new": 0.8}]
  assert (tmp_path / "config.json").read_text() == config_json
  assert run_record.saved_config(str(tmp_path))["lr"] == 0.01
  with pytest.raises(run_record.RunChangedError, match=r"lr: 0.01 -> 0.003"):  # going back is a change too.
    run_record.start(_config(**{"optim.b1": 0.8}), str(tmp_path), DIGITS, step=11)


def test_bookkeeping_keys_are_free(tmp_path):
  run_record.start(_config(), str(tmp_path), DIGITS, step=None)
  run_record.start(_config(log_every_steps=3, checkpoint_every_steps=7, keep_checkpoints=1, eval_batch_size=64,
                           data_dir="/elsewhere", **{"evals.eval.every_steps": 5, "evals.fewshot.batch_size": 8}),
                   str(tmp_path), DIGITS, step=7)
  assert run_record.changes(str(tmp_path)) == []


def test_another_dataset_of_the_same_shapes_is_refused_unless_allowed(tmp_path):
  run_record.start(_config(), str(tmp_path), DIGITS, step=None)
  renamed = {**DIGITS, "class_names": ["zero", *DIGITS["class_names"][1:]]}
  with pytest.raises(run_record.RunChangedError, match=r"(?s)differs from the one recorded .*class_names: .*"
                                                         r"--config.allow_changes=dataset"):
    run_record.start(_config(), str(tmp_path), renamed, step=3)
  run_record.start(_config(allow_changes="dataset"), str(tmp_path), renamed, step=3)
  assert run_record.class_names(str(tmp_path))[0] == "zero"
  assert json.loads((tmp_path / "dataset.json").read_text()) == DIGITS
  run_record.start(_config(), str(tmp_path), renamed, step=5)  # the allowed change is now the run's dataset.


def test_a_run_from_before_the_record_gets_one_at_resume(tmp_path):
  (tmp_path / "config.json").write_text(_config().to_json_best_effort())
  assert run_record.class_names(str(tmp_path)) is None
  run_record.start(_config(), str(tmp_path), DIGITS, step=4)
  assert run_record.class_names(str(tmp_path)) == DIGITS["class_names"]


def test_a_garbled_record_is_named(tmp_path):
  run_record.start(_config(), str(tmp_path), DIGITS, step=None)
  (tmp_path / "config_changes.json").write_text("[{")
  with pytest.raises(ValueError, match=r"config_changes.json is not valid JSON"):
    run_record.start(_config(), str(tmp_path), DIGITS, step=4)


def test_a_resume_on_another_process_count_reads_the_recorded_input_shards_or_is_refused(tmp_path, monkeypatch):
  processes = lambda n: monkeypatch.setattr(run_record.jax, "process_count", lambda: n)
  processes(2)
  assert run_record.start(_config(), str(tmp_path), DIGITS, step=None).input_shards == 2  # one per process.
  assert json.loads((tmp_path / "config.json").read_text())["input_shards"] == 2
  processes(1)  # one process reads both shards.
  assert run_record.start(_config(), str(tmp_path), DIGITS, step=4).input_shards == 2
  processes(4)  # four cannot share two: refused in one line naming the switch.
  with pytest.raises(run_record.RunChangedError) as error:
    run_record.start(_config(), str(tmp_path), DIGITS, step=6)
  message = str(error.value)
  assert "\n" not in message and "at step 6 on 4 processes cannot keep the order of its training examples" in message
  assert "reads them in 2 input shards" in message and "--config.allow_changes=input_shards" in message
  assert run_record.start(_config(allow_changes="input_shards"), str(tmp_path), DIGITS, step=6).input_shards == 4
  assert run_record.changes(str(tmp_path)) == [{"step": 6, "key": "input_shards", "old": 2, "new": 4}]
  with pytest.raises(ValueError, match=r"config.input_shards=6 is not a multiple of the 4 processes"):
    run_record.start(_config(input_shards=6), str(tmp_path), DIGITS, step=8)
  with pytest.raises(run_record.RunChangedError, match=r"input_shards: 4 -> 8"):  # a change like any other.
    run_record.start(_config(input_shards=8), str(tmp_path), DIGITS, step=8)
