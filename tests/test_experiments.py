"""`python -m experiments.run`: every smoke variant, config errors, sweeps that resume and fail well."""

import csv
import json
import math
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest

import cnnjax
from cnnjax.experiments import cli, common, kinds, reports, scaling
from cnnjax.experiments.kinds import degradation, efficientnet_scaling
from cnnjax.experiments import sweep
from cnnjax.experiments.sweep import read_status
from cnnjax.train import default_config

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = REPO / "experiments" / "configs"

# What each experiment promises besides results.csv/json and report.md.
PROMISED = {
    "quickstart": [],
    "degradation": ["training_error.png"],
    "depthwise": ["cost_ratio.json"],
    "efficientnet_scaling": ["grid_search.png", "accuracy_vs_flops.png"],
    "finetune": ["trials/000-pretrain/pretrained.safetensors"],
    "zoo": [],
}


@pytest.fixture
def data_env(digits_data_dir, monkeypatch):
  monkeypatch.setenv("CNNJAX_DATA_DIR", str(digits_data_dir))
  return digits_data_dir


def _run(args):
  return cli.main([*args, "--cache_dir="])  # keep the test session's compilation cache


def _rows(workdir):
  with open(workdir / "results.csv", newline="") as handle:
    return list(csv.DictReader(handle))


def test_every_experiment_is_listed_with_one_line(capsys):
  assert cli.main(["--list"]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert [line.split()[0] for line in lines] == sorted(PROMISED)
  assert all(len(line.split()) > 4 for line in lines)
  assert "(default)" in next(line for line in lines if line.startswith("quickstart"))


@pytest.mark.parametrize("name", sorted(PROMISED))
def test_smoke_variant_runs_and_writes_what_it_promises(name, data_env, tmp_path, capsys):
  workdir = tmp_path / name
  assert _run([f"--config={CONFIGS / name}.py:smoke", f"--workdir={workdir}"]) == 0
  out = capsys.readouterr().out
  assert f"results: {workdir / 'results.csv'}" in out
  rows = _rows(workdir)
  assert rows and all(row["status"] == "done" for row in rows)
  assert all(0.0 <= float(row["accuracy"]) <= 1.0 for row in rows)
  assert len(json.loads((workdir / "results.json").read_text())) == len(rows)
  assert (workdir / "report.md").read_text().startswith(f"# {name}")
  for promised in PROMISED[name]:
    path = workdir / promised
    assert path.exists() and path.stat().st_size > 0, promised
    if promised.endswith(".png"):
      assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    elif promised.endswith(".safetensors"):
      assert "conv1.weight" in cnnjax.weights.read_safetensors(path)
    else:
      json.loads(path.read_text())
  if name == "quickstart":
    assert "final test accuracy" in out and (workdir / "checkpoints").is_dir()
  if name == "degradation":
    _check_publishing(workdir, tmp_path / "published" / name, capsys)


def _check_publishing(workdir, destination, capsys):
  """A finished run is published with provenance once; a second publish is refused."""
  config = f"--config={CONFIGS / 'degradation'}.py:smoke"
  assert _run([config, f"--workdir={workdir}", f"--publish={destination}"]) == 0
  copied = sorted(p.name for p in destination.iterdir())
  assert copied == sorted(["PROVENANCE.md", "report.md", "results.csv", "results.json", "trials",
                           *[p.name for p in workdir.glob("*.png")]])
  assert (destination / "results.csv").read_bytes() == (workdir / "results.csv").read_bytes()
  # The trials' records travel, without checkpoints: the sweep rebuilds from them, training nothing.
  for trial in (workdir / "trials").iterdir():
    published = destination / "trials" / trial.name
    assert sorted(p.name for p in published.iterdir()) == sorted(sweep.RECORD_FILES)
    assert all((published / n).read_bytes() == (trial / n).read_bytes() for n in sweep.RECORD_FILES)
  rebuilt = destination.parent / "rebuilt"
  assert _run([config, f"--workdir={rebuilt}", f"--merge_from={destination}"]) == 0
  assert _stable_table(rebuilt) == _stable_table(workdir)
  assert not list(rebuilt.glob("trials/*/checkpoints"))
  provenance = (destination / "PROVENANCE.md").read_text()
  assert "--publish" in provenance and "degradation.py:smoke" in provenance
  assert " cores, " in provenance and "jax " in provenance
  # The trials name the machine they trained on, read from their own records.
  trials = len(list(workdir.glob("trials/*/status.json")))
  here = reports.machine()
  assert f"- Trials: {trials}, started " in provenance
  assert f"  - {here['cpu']}, {here['cores']} cores" in provenance
  assert provenance.rstrip().endswith(f"({trials} trials)")
  before = {p: p.read_bytes() for p in destination.rglob("*") if p.is_file()}
  capsys.readouterr()
  assert _run([config, f"--workdir={workdir}", f"--publish={destination}"]) == 2
  assert "already exists; published results are never overwritten" in capsys.readouterr().err
  assert {p: p.read_bytes() for p in destination.rglob("*") if p.is_file()} == before
  capsys.readouterr()
  assert _run([config, f"--workdir={workdir}", "--publish="]) == 2
  assert "--publish needs a directory" in capsys.readouterr().err


def test_a_typo_in_a_config_key_is_an_error_that_names_it(capsys):
  code = _run([f"--config={CONFIGS / 'quickstart.py'}:smoke",
               "--config.train.optimizer.lerning_rate=1"])
  err = capsys.readouterr().err
  assert code == 2 and 'Did you mean "learning_rate" instead of "lerning_rate"' in err


def _scaling_config(**changes):
  from experiments.configs import efficientnet_scaling

  config = efficientnet_scaling.get_config("smoke")
  for key, value in changes.items():
    config.scaling[key] = value
  return config


@pytest.mark.parametrize("changes, message", [
    ({"budget_check": 0.5}, r"budget_check must be 0 \(off\) or a factor above 1.*0.5"),
    ({"grid_alpha": (0.9, 1.2)}, r"alpha >= 1 .*\[0.9\]"),
    ({"tolerance": 0.01}, r"no grid point satisfies .* the closest"),
    ({"base_resolution": 24}, r"resolution 24 is below the network's minimum of 32"),
    ({"phis": (0, 1)}, r"phis must be >= 1"),
    ({"zero_init_methods": ("compound",)}, r"zero_init_methods takes .*'depth'.*\['compound'\]"),
    ({"zero_init_methods": ("depth",)}, r"zero_init_methods .* needs config.scaling.baselines"),
])
def test_impossible_scaling_settings_fail_before_anything_trains(changes, message, tmp_path):
  with pytest.raises(scaling.ScalingConfigError, match=message):
    kinds.run(_scaling_config(**changes), tmp_path)
  assert not (tmp_path / "trials").exists()


def test_grid_candidates_satisfy_the_constraint():
  grid = (1.0, 1.1, 1.2, 1.3)
  kept = scaling.grid_candidates(grid, grid, grid, 2.0, 0.1)
  every = [(a, b, g) for a in grid for b in grid for g in grid]
  assert kept == sorted(c for c in every if abs(c[0] * c[1] ** 2 * c[2] ** 2 - 2) <= 0.1)
  assert (1.2, 1.1, 1.2) in kept and (1.2, 1.1, 1.1) not in kept


def test_single_dimension_scaling_meets_the_target_flops():
  base = scaling.Base(width=0.5, depth=0.5, resolution=32)

  def flops_of(point):  # a network whose FLOPs follow width^2 * ceil-rounded depth * resolution^2
    import math
    return 1e6 * (point.width / 0.5) ** 2 * math.ceil(point.depth * 8) / 4 * (point.resolution / 32) ** 2

  target = 4.0e6 * 1.7
  for method in ("width", "depth", "resolution"):
    point = scaling.single_dimension_point(base, method, 2, target, flops_of)
    assert abs(flops_of(point) / target - 1) < 0.1, (method, point)
    changed = {"width": point.width != 0.5, "depth": point.depth != 0.5,
               "resolution": point.resolution != 32}
    assert [k for k, v in changed.items() if v] == [method]


def test_the_scaling_verdict_checks_the_premise_and_judges_against_the_spread():
  by_method = {
      "compound": {1: [0.80, 0.81, 0.79], 2: [0.70, 0.72, 0.71]},
      "width": {1: [0.75, 0.76, 0.74], 2: []},  # failed trials: not judged
      "resolution": {1: [0.55, 0.70, 0.85], 2: [0.90, 0.91, 0.92]},
      "depth": {1: [0.60, 0.61, 0.59], 3: [0.99, 0.99, 0.99]},  # no compound at phi 3
  }
  base = [0.60, 0.605, 0.595]
  text = "\n".join(efficientnet_scaling.scaling_verdict(by_method, base))
  assert ("At phi = 1, width beats the base (75.0% ± 1.0% against 60.0% ± 0.5%); depth does not "
          "beat the base (60.0% ± 1.0% against 60.0% ± 0.5%); resolution does not beat the base "
          "(70.0% ± 15.0% against 60.0% ± 0.5%).") in text
  assert ("- phi = 1: compound (80.0% ± 1.0%) beats width (75.0% ± 1.0%), beats depth "
          "(60.0% ± 1.0%), ties with resolution (70.0% ± 15.0%).") in text
  assert "- phi = 2: compound (71.0% ± 1.0%) loses to resolution (91.0% ± 1.0%)." in text
  assert "phi = 3" not in text
  assert efficientnet_scaling.scaling_verdict({"compound": {1: [0.8]}}, []) == []


def test_a_zero_init_twin_is_its_own_point_and_only_it_changes_the_config():
  base = scaling.Base(width=0.25, depth=0.25, resolution=64)
  depth = scaling.compound_point(base, 2.0, 1.0, 1.0, 1.0, method="depth")
  twin = depth.zero_init_twin()
  plain_trial, twin_trial = depth.trial("step2"), twin.trial("step2")
  assert twin.method == "depth_zero_init" and twin_trial.name != plain_trial.name
  # The published trials' configs (and so their finished records) stay valid: the plain point
  # gains no key; the twin differs by exactly one.
  assert "model_overrides.zero_init_residual" not in plain_trial.overrides
  assert twin_trial.overrides == {**plain_trial.overrides,
                                  "model_overrides.zero_init_residual": True}


def test_the_zero_init_verdict_compares_each_twin_with_its_plain_point_and_the_base():
  by_method = {"depth": {1: [0.55, 0.60, 0.50], 2: [0.30, 0.35, 0.33]},
               "depth_zero_init": {1: [0.70, 0.72, 0.71], 2: [0.36, 0.34, 0.35]},
               "compound": {1: [0.80, 0.81, 0.79]}}
  base = [0.68, 0.70, 0.69]
  text = "\n".join(efficientnet_scaling.scaling_verdict(by_method, base))
  assert "## Zero-initialised residual branches" in text and "timm" in text
  assert ("- phi = 1: depth_zero_init (71.0% ± 1.0%) beats depth without it (55.0% ± 5.0%), "
          "beats the base (69.0% ± 1.0%).") in text
  assert ("- phi = 2: depth_zero_init (35.0% ± 1.0%) ties with depth without it (32.7% ± 2.5%), "
          "loses to the base (69.0% ± 1.0%).") in text
  # The twin joins the premise and the compound comparison, after its plain method.
  assert "depth does not beat the base (55.0% ± 5.0% against 69.0% ± 1.0%); depth_zero_init " \
         "beats the base" in text
  assert "beats depth (55.0% ± 5.0%), beats depth_zero_init (71.0% ± 1.0%)" in text
  assert efficientnet_scaling.zero_init_verdict({"depth": {1: [0.5]}}, base) == []


def test_the_full_sweep_appends_the_zero_init_twins_after_every_other_trial(monkeypatch,
                                                                            tmp_path):
  """The twins come last, so the published trials keep their indices and directories. FLOPs
  come from a closed form here (the real measurement compiles nothing but costs a minute)."""
  from experiments.configs import efficientnet_scaling as scaling_config
  config = scaling_config.get_config()
  assert tuple(config.scaling.zero_init_methods) == ("depth",)
  sweeps = {}

  def fake_sweep(base, workdir, trials, only=None, measure=None, first_index=0):
    sweeps[first_index] = trials
    return [{"status": "done", "name": t.name, "index": first_index + i, "info": t.info,
             "result": {"top1": 0.5}} for i, t in enumerate(trials)]

  def measurer(num_classes):
    def measure(train_config):
      model = train_config.model_overrides
      flops = 1e6 * model.width**2 * math.ceil(16 * model.depth) * train_config.data.image_size**2
      return {"params": 1, "flops": flops}
    return measure

  monkeypatch.setattr(efficientnet_scaling, "run_sweep", fake_sweep)
  monkeypatch.setattr(efficientnet_scaling.common, "measurer", measurer)
  # The scenes' classes and size, without rendering them (42 s of a fresh machine's suite).
  monkeypatch.setattr(efficientnet_scaling.common, "num_classes", lambda train_config: 36)
  monkeypatch.setattr(efficientnet_scaling.common, "native_resolution", lambda train_config: 96)
  monkeypatch.setattr(efficientnet_scaling, "summary_rows",
                      lambda records, columns: [{"name": r["name"]} for r in records])
  monkeypatch.setattr(efficientnet_scaling.common, "annotate_convergence", lambda *a, **k: None)
  monkeypatch.setattr(efficientnet_scaling, "point_table", lambda rows, flops: [])
  monkeypatch.setattr(efficientnet_scaling, "_sections", lambda *a, **k: [])
  monkeypatch.setattr(efficientnet_scaling.common, "finish", lambda *a, **k: {})
  efficientnet_scaling.run(config, tmp_path, None, "")
  (first, step1), (offset, step2) = sorted(sweeps.items())
  assert first == 0 and offset == len(step1)
  methods = [t.info["method"] for t in step2]
  assert methods[-9:] == ["depth_zero_init"] * 9 and "depth_zero_init" not in methods[:-9]
  assert len(step2) == 9 * 4 + 9 - 3  # compound (phi 2, 3), 3 baselines per phi, the twins
  plain = [t for t in step2 if t.info["method"] == "depth"]
  for plain_trial, twin in zip(plain, step2[-9:], strict=True):
    assert twin.overrides == {**plain_trial.overrides, "model_overrides.zero_init_residual": True}


def test_the_budget_check_trains_the_base_longer_and_judges_it_against_the_spread():
  config = _scaling_config(budget_check=2.0)
  config.train.num_steps, config.train.num_epochs = None, 30.0  # bounded by epochs
  base = scaling.Point("base", 0, 1.0, 1.0, 1.0, 0.25, 0.1, 32)
  (trial,) = efficientnet_scaling.budget_trials(config, base)
  assert trial.overrides["num_epochs"] == 60.0 and trial.info["stage"] == "budget"
  assert trial.name != base.trial("base").name  # its own point in the tables
  assert efficientnet_scaling.budget_trials(_scaling_config(budget_check=0), base) == []
  still_learning = "\n".join(efficientnet_scaling.budget_verdict(
      [0.70, 0.72, 0.68], [0.80, 0.81, 0.79], 30, 2))
  assert "not a plateau" in still_learning
  assert ("30 epochs: 70.0% ± 2.0%; 60 epochs: 80.0% ± 1.0% (3 and 3 seeds)"
          in still_learning)
  # A gap inside either spread is no evidence that more training helps.
  assert "has plateaued" in "\n".join(efficientnet_scaling.budget_verdict(
      [0.70, 0.75, 0.65], [0.72, 0.73, 0.71], 30, 2))
  assert efficientnet_scaling.budget_verdict([0.7], [], 30, 2) == []
  one_seed = "\n".join(efficientnet_scaling.budget_verdict([0.7], [0.9], 40, 2, "steps"))
  assert "not judged" in one_seed and "40 steps: 70.0% ± n/a; 80 steps: 90.0%" in one_seed
  smoke = _scaling_config(budget_check=2.0)  # bounded by steps: the check doubles those
  (trial,) = efficientnet_scaling.budget_trials(smoke, base)
  assert trial.overrides["num_steps"] == 2 * smoke.train.num_steps


def test_the_report_states_the_budget_check(tmp_path):
  config = _scaling_config(budget_check=2.0)
  config.train.num_steps, config.train.num_epochs = None, 10.0
  base = scaling.Point("base", 0, 1.0, 1.0, 1.0, 0.25, 0.1, 32)
  trials = [base.trial("base"), *efficientnet_scaling.budget_trials(config, base)]
  rows = [{"name": f"{t.name}-s{seed}", "point": t.name, "flops": 1e6, "plateaued": False,
           **{k: t.info[k] for k in ("stage", "method", "phi", "alpha", "beta", "gamma", "width",
                                      "depth", "resolution")},
           "accuracy": accuracy}
          for t, accuracies in zip(trials, ([0.70, 0.72, 0.68], [0.80, 0.81, 0.79]), strict=True)
          for seed, accuracy in enumerate(accuracies)]
  table = efficientnet_scaling.point_table(rows, 1e6)
  text = "\n".join(efficientnet_scaling._sections(config, tmp_path, rows, table, {}, None, []))
  assert ("## Budget\n\n**Budget: not a plateau.** The base's test accuracy at 10 epochs: 70.0% ± "
          "2.0%; 20 epochs: 80.0% ± 1.0% (3 and 3 seeds)") in text


def test_plots_of_means_carry_the_seeds_spread_as_error_bars(tmp_path):
  from cnnjax.experiments import reports

  def bar_ranges(figure):
    (bars,) = [c for c in figure.axes[0].collections if c.get_segments()]
    return [tuple(np.round(segment[:, 1], 6)) for segment in bars.get_segments()]

  figure = reports.plot_bars(tmp_path / "bars.png", ["a", "b"], [0.8, 0.6], "accuracy", "t",
                             errors=[0.05, None])  # one seed: no spread, a zero bar
  assert bar_ranges(figure) == [(0.75, 0.85), (0.6, 0.6)]
  figure = reports.plot_lines(tmp_path / "lines.png", {"m": ([2, 1], [0.9, 0.7])}, "x", "y",
                              "t", errors={"m": [0.02, 0.1]})
  assert bar_ranges(figure) == [(0.6, 0.8), (0.88, 0.92)]  # sorted by x with their values
  assert (tmp_path / "bars.png").stat().st_size and (tmp_path / "lines.png").stat().st_size
  figure = reports.plot_panels(tmp_path / "panels.png",
                               {"p1": {"a": ([1, 2], [3, 2]), "_a1": ([1, 2], [3, 1])},
                                "p2": {"b": ([1, 2], [1, 1]), "a": ([1], [2])},
                                "p3": {}}, "x", "y", "t", colors={"a": "C5"})
  visible = [axes for axes in figure.axes if axes.get_visible()]
  assert [axes.get_title() for axes in visible] == ["p1", "p2", "p3"]
  assert [len(axes.lines) for axes in visible] == [2, 2, 0]
  (first, second), (_, again) = visible[0].lines, visible[1].lines
  assert first.get_color() == second.get_color() == again.get_color() == "C5"
  assert visible[1].get_xlabel() == "x"  # the slot below p2 is empty


def test_the_scaling_report_says_which_resolutions_read_upsampled_data():
  (note, _) = efficientnet_scaling.upsampling_note([64, 128, 96, 177, 128], native=96)
  assert note.startswith("The data are stored at 96 px: 128 px, 177 px read them upsampled")
  assert efficientnet_scaling.upsampling_note([64, 96], native=96) == []
  assert efficientnet_scaling.upsampling_note([512], native=None) == []  # sizes vary


def test_the_scaling_curves_fall_into_one_panel_per_stage_and_phi():
  def row(name, stage, method, phi, point, abg=(1, 1, 1)):
    return {"name": name, "stage": stage, "method": method, "phi": phi, "point": point,
            "alpha": abg[0], "beta": abg[1], "gamma": abg[2]}

  rows = [row("b-s0", "base", "base", 0, "b"), row("b-s1", "base", "base", 0, "b"),
          row("c-s0", "step1", "compound", 1, "c", (1, 1.1, 1.3)),
          row("c-s1", "step1", "compound", 1, "c", (1, 1.1, 1.3)),
          row("w-s0", "step2", "width", 1, "w"), row("x-s0", "step2", "compound", 2, "x"),
          row("u-s0", "budget", "base", 0, "u"), row("y-s0", "step2", "depth", 2, "y")]
  curves = {r["name"]: {"step": [1, 2], "loss": [2.0, 1.0]} for r in rows if r["name"] != "y-s0"}
  curves["y-s0"] = {"step": [], "loss": []}  # not started: no line
  panels = efficientnet_scaling.curve_panels(rows, curves, winner="c")
  assert list(panels) == ["step 1: candidates at phi = 1", "budget check", "step 2: phi = 1",
                          "step 2: phi = 2"]
  assert list(panels["step 1: candidates at phi = 1"]) == ["base", "_b-s1", "(1, 1.1, 1.3)",
                                                           "_c-s1"]
  assert list(panels["step 2: phi = 1"]) == ["base", "_b-s1", "compound", "_c-s1", "width"]
  assert list(panels["step 2: phi = 2"]) == ["base", "_b-s1", "compound"]
  assert list(panels["budget check"]) == ["base", "_b-s1", "base, 2x budget"]


def test_fitted_points_meet_their_flops_within_five_percent():
  base = scaling.Base(width=0.25, depth=0.25, resolution=32)

  def flops_of(point):
    return cnnjax.flops(cnnjax.create_model("efficientnet", width=point.width, depth=point.depth,
                                            channel_divisor=1),
                        (point.resolution, point.resolution, 3))

  base_flops = flops_of(scaling.compound_point(base, 1, 1, 1, 0))
  for alpha, beta, gamma in ((1.0, 1.4, 1.0), (1.2, 1.1, 1.15)):
    nominal = scaling.compound_point(base, alpha, beta, gamma, 1.0)
    fitted = scaling.fit_to_flops(base, alpha, beta, gamma, 1.0, 2 * base_flops, flops_of,
                                  iterations=8)
    assert abs(flops_of(fitted) / (2 * base_flops) - 1) <= scaling.FLOPS_TOLERANCE
    assert fitted.phi == 1.0 and fitted.exponent is not None
    # The nominal point misses (the reason for fitting); the fit keeps the proportions.
    assert (alpha, beta, gamma) == (fitted.alpha, fitted.beta, fitted.gamma)
    if (alpha, beta, gamma) == (1.0, 1.4, 1.0):
      assert flops_of(nominal) / base_flops < 1.7 and fitted.exponent > 1.2


def test_the_degradation_verdict_needs_a_gap_beyond_both_spreads():
  worse = degradation.depth_verdict("Plain", "plain20", "plain56", [0.10, 0.12, 0.11],
                                    [0.20, 0.22, 0.19])
  assert worse.endswith("the deeper network trains worse.")
  assert "20.33% ± 1.53% against 11.00% ± 1.00% for plain20" in worse
  better = degradation.depth_verdict("Residual", "resnet20", "resnet56", [0.10, 0.12, 0.11],
                                     [0.05, 0.04, 0.06])
  assert better.endswith("the deeper network trains better.")
  # A gap smaller than one model's spread is no verdict.
  tie = degradation.depth_verdict("Residual", "resnet20", "resnet56", [0.10, 0.12, 0.11],
                                  [0.02, 0.10, 0.18])
  assert tie.endswith("no difference beyond the seeds' spread.")
  one = degradation.depth_verdict("Plain", "plain20", "plain56", [0.1, 0.12, 0.11], [0.3])
  assert one == "Plain: plain56 finished one seed only; a verdict needs at least two per model."
  # A deeper network that never started is "worse", and the verdict says why.
  stuck = degradation.depth_verdict("Plain", "plain20", "plain56", [0.10, 0.12, 0.11],
                                    [0.50, 0.97, 0.60], stuck=["plain56-s1"])
  assert "the deeper network trains worse. Never left chance: plain56-s1;" in stuck


def test_a_flat_loss_at_chance_is_a_failure_to_start_not_convergence():
  steps = list(range(10, 1010, 10))
  at_chance = {"step": steps, "loss": [math.log(36)] * 100, "error": [35 / 36] * 100}
  learned = {"step": steps, "loss": [0.3] * 100, "error": [0.1] * 100}
  rows = []
  for name, curve in (("stuck", at_chance), ("fine", learned)):
    row = {"name": name, "status": "done"}
    common.annotate_convergence(row, curve, tail=5, num_classes=36)
    rows.append(row)
  assert [r["plateaued"] for r in rows] == [True, True]
  assert [r["left_chance"] for r in rows] == [False, True]
  sentence = common.plateau_sentence(rows)
  assert sentence.startswith("Every finished trial's training loss had plateaued")
  assert "Never left chance (final training loss above 90% of a uniform guess's): stuck;" in sentence
  assert "fine" not in sentence.split("Never")[1]
  # The threshold is relative to the number of classes: a loss of 0.65 is chance for two.
  row = {"name": "binary", "status": "done"}
  common.annotate_convergence(row, {"step": steps, "loss": [0.65] * 100, "error": [0.4] * 100},
                              tail=5, num_classes=2)
  assert row["left_chance"] is False
  table = degradation.model_table([{**r, "point": "m", "test_error": 0.5} for r in rows], ["m"])
  assert table[0]["left_chance"] == "1/2"


def test_the_plateau_sentence_names_the_smaller_group():
  def rows(flags):
    return [{"name": f"t{i}", "plateaued": flag} for i, flag in enumerate(flags)]

  assert common.plateau_sentence(rows([False, False, None])).startswith(
      "All 2 finished trials were still improving")
  few = common.plateau_sentence(rows([True, False, True]))
  assert few.startswith("Still improving when") and few.endswith(": t1 (1 of 3 finished trials).")
  many = common.plateau_sentence(rows([False, True, False, False]))
  assert many.startswith("3 of 4 finished trials were still improving")
  assert many.endswith("only these had plateaued: t1.") and "t0" not in many
  assert common.plateau_sentence(rows([None])) == ""


def test_plateau_change_reads_a_falling_and_a_flat_loss():
  steps = list(range(1, 101))
  falling = [2.0 - 0.015 * s for s in steps]
  flat = [0.5 + 0.001 * ((-1) ** s) for s in steps]
  assert common.plateau_change(steps, falling) > 0.1
  assert abs(common.plateau_change(steps, flat)) < 0.01
  assert common.plateau_change(steps[:5], flat[:5]) is None
  assert common.compare([0.2, 0.21, 0.19], [0.1, 0.11, 0.09]) == "higher"
  assert common.compare([0.1, 0.11], [0.2, 0.21]) == "lower"
  assert common.compare([0.1, 0.5], [0.2, 0.21]) == "tie"
  with pytest.raises(ValueError, match="distinct seeds"):
    common.with_seeds([], (1, 1))


@pytest.mark.parametrize("key, value, message", [
    ("seeds", (3, 3), r"config.seeds must be distinct seeds"),
    ("curve_tail", 0, r"curve_tail must be >= 1 logged window, got 0"),
])
def test_bad_degradation_settings_fail_before_anything_trains(key, value, message, tmp_path):
  from experiments.configs import degradation

  config = degradation.get_config("smoke")
  config[key] = value
  with pytest.raises(ValueError, match=message):
    kinds.run(config, tmp_path)
  assert not (tmp_path / "trials").exists()


def test_official_mode_uses_the_b0_b7_ratios():
  points = scaling.official_points(scaling.Base(0.5, 0.5, 32), [1, 3])
  assert [(p.width, p.depth, p.resolution) for p in points] == [(0.5, 0.55, 34), (0.6, 0.7, 43)]


def test_a_failing_trial_is_recorded_and_the_sweep_goes_on(data_env, tmp_path):
  config = ml_collections.ConfigDict()
  config.name, config.kind, config.description = "mini", "sweep", "two trials"
  config.trials = [{"name": "typo", "overrides": {"model": "resnet21"}},
                   {"name": "ok", "overrides": {}}]
  t = default_config()
  t.data.image_size, t.data.train_crop, t.data.flip = 16, "resize", False
  t.model_overrides.widths = (4, 4, 4)
  t.batch_size, t.num_steps, t.progress_bar, t.optimizer.warmup_epochs = 16, 2, False, 0.0
  t.fast_compile = True
  config.train = t
  rows = kinds.run(config, tmp_path)["rows"]
  assert [r["status"] for r in rows] == ["failed", "done"]
  assert "resnet21" in rows[0]["error"] and "resnet20" in rows[0]["error"]  # the suggestion
  status = read_status(tmp_path / "trials" / "000-typo")
  assert status["status"] == "failed" and "Traceback" in status["traceback"]


def _sweep_command(workdir, *extra):
  return [sys.executable, "-m", "experiments.run", f"--config={CONFIGS / 'degradation.py'}:smoke",
          f"--workdir={workdir}", "--cache_dir=" + os.environ.get("CNNJAX_TEST_CACHE", ""), *extra]


def _stable_table(workdir):
  return [{k: v for k, v in row.items() if k != "train_seconds"} for row in _rows(workdir)]


def _signal_during_second_trial(workdir, env, signum):
  """The smoke sweep in a process sent `signum` once its second trial has started."""
  proc = subprocess.Popen(_sweep_command(workdir), env=env, cwd=REPO, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  second = workdir / "trials" / "001-plain20-s1"
  deadline = time.time() + 300
  while not (second / "status.json").exists() and time.time() < deadline:
    assert proc.poll() is None
    time.sleep(0.02)
  proc.send_signal(signum)
  output, _ = proc.communicate(timeout=120)
  return proc, output


def _sweep_here(workdir, *extra):
  """The smoke sweep in this process: what needs no signal needs no process of its own."""
  return _run([f"--config={CONFIGS / 'degradation.py'}:smoke", f"--workdir={workdir}", *extra])


def test_an_interrupted_sweep_ends_with_the_same_table_and_trials_run_alone(data_env, tmp_path,
                                                                            capsys):
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  whole = tmp_path / "whole"
  assert _sweep_here(whole) == 0

  interrupted = tmp_path / "interrupted"
  second = interrupted / "trials" / "001-plain20-s1"
  _signal_during_second_trial(interrupted, env, signal.SIGKILL)
  assert read_status(second)["status"] == "running" and not (interrupted / "results.csv").exists()
  assert _sweep_here(interrupted) == 0
  assert _stable_table(interrupted) == _stable_table(whole)

  # Preempted (SIGTERM) during its second trial: that trial saves, no third one starts, the
  # sweep exits 75; the same command finishes it with the uninterrupted sweep's table.
  preempted = tmp_path / "preempted"
  running = preempted / "trials" / "001-plain20-s1"
  proc, output = _signal_during_second_trial(preempted, env, signal.SIGTERM)
  assert proc.returncode == 75, output[-3000:]
  assert re.search(r"preempted (at step \d+|before the next trial); rerun the same command",
                   output), output[-3000:]
  assert read_status(running)["status"] == "running"
  assert sorted(p.name for p in (preempted / "trials").iterdir()) == [
      "000-plain20-s0", "001-plain20-s1"]
  assert _sweep_here(preempted) == 0
  assert _stable_table(preempted) == _stable_table(whole)

  alone = tmp_path / "alone"
  assert _sweep_here(alone, "--trial=1") == 0
  rows = _rows(alone)
  assert [r["status"] for r in rows] == ["pending", "done", "pending", "pending"]
  assert rows[1]["accuracy"] == _rows(whole)[1]["accuracy"]
  assert not (alone / "trials" / "000-plain20-s0").exists()

  # --trial K on a finished trial trains nothing and rewrites the report: a look at a sweep.
  metrics = (whole / "trials" / "000-plain20-s0" / "metrics.jsonl").read_bytes()
  table = _stable_table(whole)
  (whole / "report.md").unlink()
  assert _sweep_here(whole, "--trial=0") == 0
  assert (whole / "report.md").exists() and _stable_table(whole) == table
  assert (whole / "trials" / "000-plain20-s0" / "metrics.jsonl").read_bytes() == metrics

  # Another machine's finished trial joins a workdir by its records alone: nothing trains.
  merged = tmp_path / "merged"
  capsys.readouterr()
  assert _sweep_here(merged, f"--merge_from={alone}", "--trial=1") == 0
  assert "1 finished trials copied" in capsys.readouterr().out
  assert _stable_table(merged) == _stable_table(alone)
  trial = merged / "trials" / "001-plain20-s1"
  assert sorted(p.name for p in trial.iterdir()) == sorted(sweep.RECORD_FILES)
  assert (trial / "metrics.jsonl").read_bytes() == (
      alone / "trials" / trial.name / "metrics.jsonl").read_bytes()
  # A finished trial counts only under the config it was trained with.
  assert _sweep_here(merged, "--trial=1", "--config.train.optimizer.learning_rate=0.5") == 2
  error = capsys.readouterr().err
  assert "ConfigMismatchError: finished trial 001-plain20-s1" in error
  assert "optimizer.learning_rate" in error
  assert _stable_table(merged) == _stable_table(alone)  # nothing written over


def test_provenance_names_the_machines_each_trial_was_trained_on(tmp_path):
  """Merged trials keep their own machine; a record from before machines were kept says so."""
  def machine(cpu):
    return {"cpu": cpu, "cores": 2, "platform": "Linux", "python": "3.11.7", "jax": "0.10.2",
            "devices": ["cpu:0"]}

  records = [("000-a", "2026-11-28T10:00:00", machine("AMD EPYC")),
             ("001-b", "2026-12-05T09:00:00", machine("AMD EPYC")),
             ("002-c", "2026-12-01T12:00:00", machine("Intel Xeon")),
             ("003-d", "2026-11-30T08:00:00", None)]
  for name, started, trained_on in records:
    record = {"status": "done", "started": started}
    if trained_on:
      record["machine"] = trained_on
    _fake_trial(tmp_path / "trials" / name, "done")
    (tmp_path / "trials" / name / "status.json").write_text(json.dumps(record))
  lines = reports.trained_on(tmp_path)
  assert lines[0] == "- Trials: 4, started 2026-11-28 to 2026-12-05; trained on:"
  assert lines[1].startswith("  - AMD EPYC, 2 cores, Linux;") and lines[1].endswith("(2 trials)")
  assert sorted(lines[2:]) == sorted([
      "  - Intel Xeon, 2 cores, Linux; Python 3.11.7, jax 0.10.2; devices: cpu:0 (1 trial)",
      "  - not recorded (1 trial)"])
  assert reports.trained_on(tmp_path / "no-sweep") == []
  for name in ("000-a", "001-b", "002-c"):
    (tmp_path / "trials" / name / "status.json").unlink()
  assert reports.trained_on(tmp_path)[0] == "- Trials: 1, started 2026-11-30; trained on:"


def _fake_trial(directory, status, **files):
  directory.mkdir(parents=True)
  for name, text in {"config.json": "{}", "metrics.jsonl": "", **files}.items():
    (directory / name).write_text(text)
  (directory / "status.json").write_text(json.dumps({"status": status, "name": directory.name}))


def test_merging_copies_finished_records_and_never_overwrites(tmp_path):
  source, workdir = tmp_path / "source", tmp_path / "workdir"
  _fake_trial(source / "trials" / "000-a", "done",
              **{"metrics.jsonl": '{"step": 1}\n', "weights.safetensors": "kept beside"})
  _fake_trial(source / "trials" / "001-b", "done")
  _fake_trial(source / "trials" / "002-c", "failed")
  _fake_trial(source / "trials" / "003-d", "done")
  (source / "trials" / "000-a" / "checkpoints").mkdir()
  (source / "trials" / "000-a" / "lease.json").write_text("{}")  # a record of no trial
  _fake_trial(workdir / "trials" / "001-b", "done", **{"config.json": '{"mine": 1}'})
  unfinished = workdir / "trials" / "003-d"
  unfinished.mkdir(parents=True)
  (unfinished / "status.json").write_text('{"status": "running"}')
  before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}

  merged = sweep.merge_finished(source, workdir)

  assert (merged.copied, merged.kept, merged.unfinished_here) == (["000-a"], ["001-b"], ["003-d"])
  copied = workdir / "trials" / "000-a"
  records = sorted([*sweep.RECORD_FILES, "weights.safetensors"])
  assert sorted(p.name for p in copied.iterdir()) == records  # no lease, no checkpoints
  assert all((copied / n).read_bytes() == (source / "trials" / "000-a" / n).read_bytes()
             for n in records)
  assert {p: p.read_bytes() for p in before} == before  # the workdir's own files untouched
  assert not (workdir / "trials" / "002-c").exists()  # a failed trial is no result
  again = sweep.merge_finished(source, workdir)
  assert (again.copied, again.kept) == ([], ["000-a", "001-b"])

  # A trial that a live process is training here is left to it, even before it wrote anything.
  _fake_trial(source / "trials" / "004-e", "done")
  training = workdir / "trials" / "004-e"
  training.mkdir()
  (training / "lease.json").write_text(json.dumps({
      "host": socket.gethostname(), "pid": os.getppid(), "heartbeat": time.time(),
      "started": time.time(), "token": "another process"}))
  assert sweep.merge_finished(source, workdir).unfinished_here == ["003-d", "004-e"]
  assert [p.name for p in training.iterdir()] == ["lease.json"]


def test_bad_merge_sources_are_clear_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="no trials/ directory"):
    sweep.merge_finished(tmp_path / "nowhere", tmp_path / "workdir")
  _fake_trial(tmp_path / "trials" / "000-a", "done")
  with pytest.raises(ValueError, match="into itself"):
    sweep.merge_finished(tmp_path, tmp_path)
  (tmp_path / "trials" / "000-a" / "config.json").unlink()
  with pytest.raises(FileNotFoundError, match="lacks config.json"):
    sweep.merge_finished(tmp_path, tmp_path / "workdir")
  assert not (tmp_path / "workdir" / "trials" / "000-a" / "status.json").exists()


def test_bad_trials_and_foreign_workdirs_are_clear_errors_that_keep_the_results(data_env, tmp_path,
                                                                              capsys):
  quickstart = f"--config={CONFIGS / 'quickstart.py'}:smoke"
  assert _run([quickstart, f"--workdir={tmp_path}"]) == 0
  kept = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and "checkpoints" in p.parts}
  capsys.readouterr()
  # The same workdir with another model: refused, nothing overwritten.
  assert _run([quickstart, f"--workdir={tmp_path}", "--config.train.model=plain20"]) == 2
  assert "ConfigMismatchError" in capsys.readouterr().err
  assert {p: p.read_bytes() for p in kept} == kept
  assert _run([quickstart, f"--workdir={tmp_path / 'single'}", "--trial=1"]) == 2
  assert "single run" in capsys.readouterr().err
  degradation = f"--config={CONFIGS / 'degradation.py'}:smoke"
  assert _run([degradation, f"--workdir={tmp_path / 'sweep'}", "--trial=7"]) == 2
  assert "--trial 7 does not exist" in capsys.readouterr().err
  assert _run([degradation, f"--workdir={tmp_path / 'sweep'}", "--merge_from="]) == 2
  assert "--merge_from needs a sweep's workdir" in capsys.readouterr().err
  assert _run([degradation, f"--workdir={tmp_path / 'sweep'}",
               f"--merge_from={tmp_path / 'nowhere'}"]) == 2
  assert "nowhere has no trials/ directory" in capsys.readouterr().err


def test_a_finetune_sweep_split_over_machines_carries_the_pretrained_weights(
    data_env, tmp_path, monkeypatch, capsys):
  """Machine A pretrains (--trial 0); machine B, without shared storage, merges and fine-tunes."""
  config = f"--config={CONFIGS / 'finetune.py'}:smoke"
  machine_a, machine_b = tmp_path / "a", tmp_path / "b"
  machine_a.mkdir(), machine_b.mkdir()
  monkeypatch.chdir(machine_a)  # the workdirs' absolute paths differ, and so do the weights'
  assert _run([config, "--workdir=runs/finetune", "--trial=0"]) == 0
  pretrained = machine_a / "runs/finetune/trials/000-pretrain"
  monkeypatch.chdir(machine_b)
  assert _run([config, "--workdir=runs/finetune",
               f"--merge_from={machine_a / 'runs/finetune'}"]) == 0
  assert "1 finished trials copied" in capsys.readouterr().out
  carried = machine_b / "runs/finetune/trials/000-pretrain"
  assert not (carried / "checkpoints").exists()
  weights = (carried / "pretrained.safetensors").read_bytes()
  assert weights == (pretrained / "pretrained.safetensors").read_bytes()

  (carried / "pretrained.safetensors").unlink()  # lost on the way: nothing to export it from
  assert _run([config, "--workdir=runs/finetune"]) == 2
  assert "neither pretrained.safetensors nor checkpoints" in capsys.readouterr().err
  (carried / "pretrained.safetensors").write_bytes(weights)
  assert _run([config, "--workdir=runs/finetune"]) == 0
  rows = _rows(machine_b / "runs/finetune")
  assert [(r["name"], r["status"]) for r in rows] == [
      ("pretrain", "done"), ("finetune", "done"), ("linear_probe", "done"), ("scratch", "done")]
  assert not (carried / "checkpoints").exists()  # trial 0 was not trained again
  assert (carried / "pretrained.safetensors").read_bytes() == weights


def test_finetune_from_a_weights_file_on_an_image_folder(tmp_path, capsys):
  """The user's path: their own weights (1000 classes) and a folder of images (2 classes)."""
  from PIL import Image

  root = tmp_path / "pets"
  rng = np.random.default_rng(0)
  for split, count in (("train", 8), ("test", 4)):
    for label in ("cat", "dog"):
      (root / split / label).mkdir(parents=True)
      for i in range(count):
        pixels = rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / split / label / f"{i}.png")
  model = cnnjax.create_model("resnet18", width=4)
  variables = model.init(jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32))
  weights_path = cnnjax.save_weights("resnet18", variables, tmp_path / "imagenet.safetensors",
                                     width=4)
  workdir = tmp_path / "run"
  assert _run([f"--config={CONFIGS / 'finetune.py'}:smoke", f"--workdir={workdir}",
               f"--config.init_from={weights_path}",
               f"--config.train.data.dataset=folder:{root}",
               f"--config.train.data.data_dir={tmp_path / 'tfds'}",
               "--config.train.data.mean=(0.5, 0.5, 0.5)",
               "--config.train.data.std=(0.25, 0.25, 0.25)", "--config.train.batch_size=8"]) == 0
  rows = _rows(workdir)
  assert [r["name"] for r in rows] == ["finetune", "linear_probe", "scratch"]
  assert all(r["status"] == "done" for r in rows)
  assert not list(workdir.rglob("pretrained.safetensors"))  # the given file, no pretraining
  assert f"Weights: `{weights_path}`" in (workdir / "report.md").read_text()
  # A weights file that is not there fails before anything trains.
  assert _run([f"--config={CONFIGS / 'finetune.py'}:smoke", f"--workdir={tmp_path / 'other'}",
               f"--config.init_from={tmp_path / 'absent.pth'}"]) == 2
  assert "no weights file" in capsys.readouterr().err
