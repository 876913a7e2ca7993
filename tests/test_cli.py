"""The command line `python -m cnnjax.summary` (experiments.run: test_experiments.py)."""

from cnnjax.summary import main as summary_main


def test_summary_cli_prints_the_table(capsys):
  assert summary_main(["resnet20", "--size", "32"]) == 0
  out = capsys.readouterr().out
  assert "stage3_2/conv2" in out and "269,722 parameters" in out and "81,102,080" not in out
  assert "40,551,040 MACs" in out


def test_summary_cli_errors_are_clear(capsys):
  assert summary_main(["alexnet", "--size", "32"]) == 2
  assert "smallest input that works is 63x63" in capsys.readouterr().err
  assert summary_main(["resnet19"]) == 2
  assert "Closest: resnet18" in capsys.readouterr().err


def test_summary_cli_prints_the_measured_zoo(capsys):
  assert summary_main(["--zoo", "plain2*"]) == 0
  out = capsys.readouterr().out
  assert "plain20" in out and "269,722" in out and "0.081" in out
  assert summary_main(["--zoo", "nonexistent*"]) == 2


def test_importing_the_cli_keeps_cnnjax_summary_callable():
  import cnnjax
  import cnnjax.summary  # noqa: F401  (rebinds the package attribute to the module)
  table = cnnjax.summary(cnnjax.create_model("resnet20"), 32)
  assert table.total_params == 269_722
