"""benchmarks/accelerator.py runs end to end (here on CPU, cnnjax alone, tiny settings)."""

from __future__ import annotations

import json

import pytest

from benchmarks import accelerator, common


def test_the_accelerator_benchmark_runs_and_records_its_rows(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(common, "RESULTS", tmp_path)
  accelerator.main(["--models", "resnet20", "--size", "16", "--batches", "4",
                    "--dtypes", "float32,bfloat16", "--rounds", "1", "--steps", "1",
                    "--peak_n", "128", "--no_torch", "--pipeline_workers", "0",
                    "--pipeline_batch", "8"])
  record = json.loads((tmp_path / "accelerator.json").read_text())
  assert record["machine"]["devices"] and record["size"] == 16
  assert [(r["model"], r["batch"], r["dtype"]) for r in record["rows"]] == [
      ("resnet20", 4, "float32"), ("resnet20", 4, "bfloat16")]
  for row in record["rows"]:
    assert row["cnnjax_images_per_s"] > 0 and row["cnnjax_fraction_of_matmul_peak"] > 0
    assert row["torch_images_per_s"] is None
  assert record["errors"] == []
  assert record["input_pipeline"]["images_per_s"]["workers_0"] > 0
  assert "| resnet20 | 4 | bfloat16 |" in capsys.readouterr().out


@pytest.mark.parametrize("kind,dtype,peak", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989.4), ("NVIDIA H200", "float32", 494.7),
    ("NVIDIA H100 PCIe", "bfloat16", 756.0), ("cpu", "bfloat16", None)])
def test_datasheet_peaks_by_device_kind(kind, dtype, peak):
  assert accelerator.datasheet_tflops(kind, dtype) == peak


def test_a_pipeline_batch_count_below_one_is_refused(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(common, "RESULTS", tmp_path)
  with pytest.raises(SystemExit) as exit_:
    accelerator.main(["--models", "", "--pipeline_batches", "0"])
  assert exit_.value.code == 2
  assert "--pipeline_batches must be at least 1, got 0" in capsys.readouterr().err
  assert list(tmp_path.iterdir()) == []
