"""The command line reads cleanly: one `error:` line per user error, a log without control
characters, tracebacks or irrelevant warnings, counts as integers; it runs with the allocator
settings (cnnjax.host_allocator) and says so."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cnnjax import host_allocator
from cnnjax.experiments import cli
from tests.conftest import REPO, without_allocator_settings

QUICKSTART = f"--config={REPO / 'experiments' / 'configs' / 'quickstart.py'}:smoke"


@pytest.fixture
def data_env(digits_data_dir, monkeypatch):
  monkeypatch.setenv("CNNJAX_DATA_DIR", str(digits_data_dir))
  return digits_data_dir


def _run(args):
  return cli.main([*args, "--cache_dir="])


def _one_error_line(err: str) -> str:
  lines = [line for line in err.splitlines() if line.strip()]
  assert lines and lines[-1].startswith("error: "), err
  assert "Traceback" not in err, err
  return lines[-1]


def test_a_nan_loss_ends_with_one_error_line_and_exit_1(data_env, tmp_path, capsys):
  code = _run([QUICKSTART, f"--workdir={tmp_path}", "--config.train.optimizer.learning_rate=1e12",
               "--config.train.optimizer.warmup_epochs=0"])
  line = _one_error_line(capsys.readouterr().err)
  assert code == 1
  assert "not finite" in line or "non-finite" in line or "loss is nan" in line, line


def test_verbose_adds_the_traceback(capsys):
  assert _run([QUICKSTART, "--config.train.modle=x", "--verbose"]) == 2
  err = capsys.readouterr().err
  assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: ")


def test_a_config_typo_reads_as_text_not_as_a_repr(capsys):
  assert _run([QUICKSTART, "--config.train.modle=resnet20"]) == 2
  line = _one_error_line(capsys.readouterr().err)
  assert "\\n" not in line and "\\'" not in line, line
  assert 'Did you mean "model" instead of "modle"?' in line


@pytest.mark.parametrize("args, message", [
    (["--config.train.batch_size=many"], "batch_size"),
    (["--config.train.data.dataset=cifar10"], "tfds build cifar10"),
])
def test_bad_overrides_and_missing_data_are_one_line(args, message, tmp_path, monkeypatch, capsys):
  monkeypatch.setenv("CNNJAX_DATA_DIR", str(tmp_path / "empty"))
  assert _run([QUICKSTART, f"--workdir={tmp_path / 'run'}", *args]) == 2
  assert message in _one_error_line(capsys.readouterr().err)


def test_a_log_file_reads_like_a_report(tmp_path):
  """No terminal: plain progress lines, no carriage returns, no OpenCV advice, integer counts.

  The data directory is new, so the log also holds the embedded dataset's preparation.
  """
  log = tmp_path / "log.txt"
  with open(log, "w") as handle:
    out = subprocess.run([sys.executable, "-m", "experiments.run", QUICKSTART,
                          f"--workdir={tmp_path / 'run'}", "--config.train.progress_bar=True",
                          "--config.train.num_steps=20", "--config.train.log_every_steps=2",
                          "--cache_dir="],
                         cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, timeout=600,
                         env={**without_allocator_settings(os.environ),
                              "CNNJAX_DATA_DIR": str(tmp_path / "data")})
  text = log.read_text()
  assert out.returncode == 0, text[-3000:]
  if host_allocator.supported():  # started without MALLOC_* variables: set at import, unless
    # this machine measured no gain from them
    assert any(line == "host allocator: active" or line.startswith(
        "host allocator: not applied: this machine measured") for line in text.splitlines())
  assert "\r" not in text and "\x1b" not in text
  assert "OpenCV" not in text and "Traceback" not in text
  assert "train step 20/20 (100%): loss " in text
  progress = [line for line in text.splitlines() if line.startswith("train step ")]
  assert 1 < len(progress) <= 21
  assert " test images)" in text and ".0 test images" not in text


def test_reading_back_a_run_or_a_sweep_names_what_is_missing(tmp_path):
  from cnnjax import train
  from cnnjax.experiments import reports

  with pytest.raises(ValueError, match="which must be 'best' or 'latest', got 'worst'"):
    train.evaluate_checkpoint(tmp_path, which="worst")
  with pytest.raises(FileNotFoundError, match=r"holds no run \(no config.json\)"):
    train.evaluate_checkpoint(tmp_path)
  with pytest.raises(FileNotFoundError, match="has no results.json: run the experiment there"):
    reports.read_results(tmp_path)
  assert list(tmp_path.iterdir()) == []   # reading writes nothing


def test_a_full_disk_ends_with_one_error_line_and_exit_1(tmp_path, monkeypatch, capsys):
  from cnnjax.experiments import kinds
  from cnnjax.train.checkpoint import DiskFullError

  def full(*args, **kwargs):
    raise DiskFullError(28, f"no space left in {tmp_path} for the checkpoint of step 8: it needs "
                            "up to 1.0 MiB (1,048,576 bytes, the train state), 0.0 MiB are free; "
                            "the checkpoint of step 4 is kept and readable. Free space there and "
                            "rerun the same command to resume")

  monkeypatch.setattr(kinds, "run", full)
  assert _run([QUICKSTART, f"--workdir={tmp_path}"]) == 1
  line = _one_error_line(capsys.readouterr().err)
  assert line.startswith(f"error: DiskFullError: [Errno 28] no space left in {tmp_path}"), line
  assert "1,048,576 bytes" in line and "step 4 is kept" in line
