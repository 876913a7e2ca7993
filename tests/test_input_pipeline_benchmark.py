"""The input-pipeline benchmark's command line: what it refuses, before it measures anything."""

import pytest

from benchmarks import common, input_pipeline


def test_a_size_without_a_case_is_refused_naming_the_cases(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(common, "RESULTS", tmp_path)
  with pytest.raises(SystemExit) as exit_:
    input_pipeline.main(["--sizes", "64,48"])
  assert exit_.value.code == 2
  assert "--sizes [48] not among the cases [32, 64, 224]" in capsys.readouterr().err
  assert list(tmp_path.iterdir()) == []
