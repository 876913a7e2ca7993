"""The experiments: what each kind trains and what it reports.

Every kind takes the experiment config, its workdir and optionally one trial
index, runs (or resumes) its trials through `sweep`, and writes its results
(`results.csv`, `results.json`, `report.md`, plots) into the workdir.
"""

from __future__ import annotations

import contextlib
import functools
import json
import pathlib
import time
from collections.abc import Callable, Sequence

import ml_collections

from cnnjax import analysis, lease, registry
from cnnjax.experiments import reports, scaling, sweep
from cnnjax.experiments.sweep import (DONE, Trial, apply_overrides, run_sweep, summary_rows,
                                      trial_dir)
from cnnjax.train.config import model_overrides
from cnnjax.train.logs import read_metrics


# -- shared helpers ----------------------------------------------------------------------------


def _num_classes(train_config) -> int:
  """The classes the trials train for (preparing an embedded dataset if needed)."""
  from cnnjax import data  # noqa: PLC0415

  info = data.prepare(train_config.data.dataset, train_config.data.data_dir,
                      progress=train_config.progress_bar, backend=train_config.data.backend)
  return train_config.data.num_classes or info.num_classes


def _model_for(config, num_classes: int):
  return registry.create_model(config.model, num_classes=num_classes, **model_overrides(config))


@functools.lru_cache(maxsize=512)
def _static_cost(model_name: str, overrides: tuple, num_classes: int, size: int,
                 channels: int) -> tuple[int, int]:
  model = registry.create_model(model_name, num_classes=num_classes, **dict(overrides))
  result = analysis.summary(model, (size, size, channels))
  return result.total_params, result.flops


def measurer(num_classes: int) -> Callable:
  """config -> {'params', 'flops'} of the model the config trains, at its input size."""
  def measure(config) -> dict:
    overrides = tuple(sorted(model_overrides(config).items()))
    info = registry.model_info(config.model)
    size = config.data.image_size or info.input_size
    params, flops = _static_cost(config.model, overrides, num_classes, size, info.channels)
    return {"model": config.model, "resolution": size, "params": params, "flops": flops}
  return measure


def _finish(workdir: pathlib.Path, title: str, rows, columns, sections: list[str],
            command: str) -> dict:
  reports.write_tables(workdir, rows, columns)
  body = [f"# {title}", "", f"Command: `{command}`", "",
          f"Written {time.strftime('%Y-%m-%d %H:%M')}.", "", *sections, "",
          "## All trials", "", reports.markdown_table(rows, columns), ""]
  (workdir / "report.md").write_text("\n".join(body))
  return {"rows": rows, "report": workdir / "report.md"}


def _fmt_pct(value) -> str:
  return "n/a" if value is None else f"{100 * value:.1f}%"


# -- train: one run ----------------------------------------------------------------------------


def run_train(config, workdir: pathlib.Path, trial: int | None, command: str) -> dict:
  from cnnjax.train import train_and_evaluate  # noqa: PLC0415

  if trial is not None:
    raise ValueError(f"experiment {config.name!r} is a single run; it has no trials to select")
  num_classes = _num_classes(config.train)
  measured = measurer(num_classes)(config.train)
  result = train_and_evaluate(config.train, workdir)
  row = {"name": config.name, **measured, "accuracy": result["top1"],
         "top5": result["top5"], "eval_examples": result["count"],
         "train_accuracy": result["train_accuracy"], "steps": result["step"],
         "train_seconds": result["train_seconds"], "images_per_second":
         result["images_per_second"], "status": DONE}
  columns = list(row)
  return _finish(workdir, f"{config.name}: {config.description}", [row], columns, [], command)


# -- a plain sweep -----------------------------------------------------------------------------

SWEEP_COLUMNS = ["trial", "name", "status", "model", "resolution", "params", "flops", "accuracy",
                 "train_accuracy", "train_seconds", "error"]


def _config_trials(config) -> list[Trial]:
  return [Trial(t["name"], dict(t["overrides"]), dict(t.get("info", {}))) for t in config.trials]


def run_plain_sweep(config, workdir, trial, command) -> dict:
  num_classes = _num_classes(config.train)
  records = run_sweep(config.train, workdir, _config_trials(config), trial, measurer(num_classes))
  rows = summary_rows(records, SWEEP_COLUMNS)
  return _finish(workdir, f"{config.name}: {config.description}", rows, SWEEP_COLUMNS, [], command)


# -- the EfficientNet compound-scaling sweep ---------------------------------------------------

SCALING_COLUMNS = ["trial", "name", "stage", "method", "alpha", "beta", "gamma", "phi", "width", "depth",
                   "resolution", "params", "flops", "accuracy", "train_accuracy",
                   "train_seconds", "status", "error"]


def _scaling_base(config) -> scaling.Base:
  s = config.scaling
  return scaling.Base(s.base_width, s.base_depth, s.base_resolution, s.min_resolution)


def scaling_plan(config) -> tuple[list[scaling.Point], list[tuple[float, float, float]]]:
  """The base point and the step-1 candidates; validates everything before training."""
  s = config.scaling
  base = _scaling_base(config)
  if s.mode not in ("phi", "official"):
    raise scaling.ScalingConfigError(f"config.scaling.mode must be 'phi' or 'official', "
                                     f"got {s.mode!r}")
  if not s.phis or min(s.phis) < 1:
    raise scaling.ScalingConfigError(f"config.scaling.phis must be >= 1, got {tuple(s.phis)}")
  candidates = scaling.grid_candidates(tuple(s.grid_alpha), tuple(s.grid_beta),
                                       tuple(s.grid_gamma), s.target, s.tolerance)
  base_point = scaling.Point("base", 0, 1.0, 1.0, 1.0, base.width, base.depth, base.resolution)
  step1 = [scaling.compound_point(base, a, b, g, 1.0) for a, b, g in candidates]
  later = [scaling.compound_point(base, a, b, g, phi) for a, b, g in candidates for phi in s.phis]
  if s.mode == "official":
    later += scaling.official_points(base, list(s.phis))
  scaling.check_resolution(base, [base_point, *step1, *later])
  return [base_point, *step1], candidates


def run_efficientnet_scaling(config, workdir, trial, command) -> dict:
  base = _scaling_base(config)
  step1_points, candidates = scaling_plan(config)
  num_classes = _num_classes(config.train)
  measure = measurer(num_classes)
  step1 = [p.trial("step1" if p.method != "base" else "base") for p in step1_points]
  records = run_sweep(config.train, workdir, step1, trial, measure)

  done = [r for r in records[1:] if r["status"] == DONE]
  step2_records, best = [], None
  if len(done) == len(records) - 1 and records[0]["status"] == DONE:
    best = max(done, key=lambda r: r["result"]["top1"])
    alpha, beta, gamma = (best["info"][k] for k in ("alpha", "beta", "gamma"))

    def flops_of(point: scaling.Point) -> float:
      trial_config = apply_overrides(config.train, point.trial("probe").overrides)
      return float(measure(trial_config)["flops"])

    points = []
    if config.scaling.mode == "official":
      points += scaling.official_points(base, list(config.scaling.phis))
    else:
      for phi in config.scaling.phis:
        compound = scaling.compound_point(base, alpha, beta, gamma, phi)
        if phi != 1:  # phi = 1 is step 1's winner, already trained
          points.append(compound)
        if config.scaling.baselines:
          target = flops_of(compound)
          points += [scaling.single_dimension_point(base, method, phi, target, flops_of)
                     for method in ("width", "depth", "resolution")]
    scaling.check_resolution(base, points)
    step2 = [p.trial("step2") for p in points]
    step2_records = run_sweep(config.train, workdir, step2, trial, measure,
                              first_index=len(step1))
  elif trial is not None and trial >= len(step1):
    raise ValueError(f"trial {trial} belongs to step 2, which needs every step-1 trial (0..."
                     f"{len(step1) - 1}) finished first")

  all_records = records + step2_records
  rows = summary_rows(all_records, SCALING_COLUMNS)
  sections = _scaling_sections(config, workdir, rows, best, candidates)
  return _finish(workdir, f"{config.name}: {config.description}", rows, SCALING_COLUMNS,
                 sections, command)


def _scaling_sections(config, workdir, rows, best, candidates) -> list[str]:
  step1 = [r for r in rows if r["stage"] == "step1"]
  base_row = next((r for r in rows if r["stage"] == "base"), None)
  sections = ["## Step 1: grid search at phi = 1", "",
              f"{len(candidates)} candidates with alpha*beta^2*gamma^2 within "
              f"{config.scaling.tolerance} of {config.scaling.target}; base network width "
              f"{config.scaling.base_width}, depth {config.scaling.base_depth}, resolution "
              f"{config.scaling.base_resolution}.", ""]
  if step1:
    sections.append(reports.markdown_table(step1, ["alpha", "beta", "gamma", "flops", "accuracy",
                                                   "status"]))
    labels = [f"a{r['alpha']:.2f} b{r['beta']:.2f} g{r['gamma']:.2f}" for r in step1]
    reports.plot_bars(workdir / "grid_search.png", labels, [r["accuracy"] for r in step1],
                      "test accuracy", "Step 1: candidates at phi = 1")
    sections += ["", "![grid search](grid_search.png)", ""]
  if best is None:
    sections += ["Step 2 waits for every step-1 trial to finish.", ""]
    return sections
  info = best["info"]
  sections += [f"Chosen: alpha = {info['alpha']:.3f}, beta = {info['beta']:.3f}, gamma = "
               f"{info['gamma']:.3f} (accuracy {_fmt_pct(best['result']['top1'])}).", "",
               "## Step 2: scaling up", ""]
  winner_row = next(r for r in step1 if r["trial"] == best["index"])
  methods = {}
  for row in rows:
    if row["stage"] == "step2" or row is winner_row:
      method = "compound" if row is winner_row else row["method"]
      methods.setdefault(method, []).append(row)
  series = {}
  for method, method_rows in methods.items():
    points = ([base_row] if base_row else []) + sorted(method_rows, key=lambda r: r["phi"])
    series[method] = ([p["flops"] / 1e6 for p in points], [p["accuracy"] for p in points])
  reports.plot_lines(workdir / "accuracy_vs_flops.png", series, "MFLOPs (forward, per image)",
                     "test accuracy", "Accuracy against FLOPs", logx=True)
  table = sorted((r for rs in methods.values() for r in rs), key=lambda r: (r["phi"], r["method"]))
  sections += [reports.markdown_table(table, ["method", "phi", "width", "depth", "resolution",
                                              "flops", "accuracy", "status"]), "",
               "![accuracy against FLOPs](accuracy_vs_flops.png)", ""]
  top_phi = max(config.scaling.phis)
  at_top = {m: next((r for r in rs if r["phi"] == top_phi), None) for m, rs in methods.items()}
  if config.scaling.mode == "phi":
    parts = [f"{m} {_fmt_pct(r['accuracy'])} at {r['flops'] / 1e6:.1f} MFLOPs"
             for m, r in at_top.items() if r is not None]
    sections += [f"At phi = {top_phi}: " + "; ".join(parts) + ".", ""]
  sections += scaling_verdict(methods, base_row)
  return sections


def scaling_verdict(methods: dict[str, list[dict]], base_row: dict | None) -> list[str]:
  """Plain sentences: the best method at each phi, and how FLOPs actually grew.

  `methods` maps a method to its finished or failed rows (with 'phi', 'accuracy',
  'flops'); a phi is judged only when compound and at least one baseline finished.
  """
  lines = []
  compound = {r["phi"]: r for r in methods.get("compound", []) if r.get("accuracy") is not None}
  judged, wins = [], 0
  for phi in sorted(compound):
    rivals = {m: r for m, rs in methods.items() if m != "compound"
              for r in rs if r["phi"] == phi and r.get("accuracy") is not None}
    if not rivals:
      continue
    best_method, best_row = max([("compound", compound[phi]), *rivals.items()],
                                key=lambda item: item[1]["accuracy"])
    wins += best_method == "compound"
    judged.append(f"phi = {phi:g}: {best_method} ({_fmt_pct(best_row['accuracy'])})")
  if judged:
    lines += ["Best method at each phi: " + "; ".join(judged) + ".",
              f"Compound scaling beats every single-dimension baseline at {wins} of "
              f"{len(judged)} phi values.", ""]
  if base_row and base_row.get("flops") and compound:
    growth = ", ".join(f"{r['flops'] / base_row['flops']:.2f}x (phi = {phi:g})"
                       for phi, r in sorted(compound.items()))
    lines += [f"Measured FLOPs of the compound points relative to the base: {growth}; the rule "
              "promises 2^phi. Channel rounding to multiples of 8 and whole repeats quantise "
              "small networks, so the measured FLOPs are what every comparison above matches.", ""]
  return lines


# -- degradation: plain against residual -------------------------------------------------------

DEGRADATION_COLUMNS = ["trial", "name", "model", "params", "flops", "final_train_error",
                       "test_error", "accuracy", "train_seconds", "status", "error"]


def _train_curve(directory: pathlib.Path) -> tuple[list[int], list[float]]:
  path = directory / "metrics.jsonl"
  if not path.exists():
    return [], []
  records = [r for r in read_metrics(path) if r["split"] == "train"]
  return [r["step"] for r in records], [1.0 - r["accuracy"] for r in records]


def run_degradation(config, workdir, trial, command) -> dict:
  if config.curve_tail < 1:
    raise ValueError(f"curve_tail must be >= 1 logged window, got {config.curve_tail}")
  if not 0.0 <= config.tie_tolerance < 1.0:
    raise ValueError(f"tie_tolerance is a difference of error rates in [0, 1), got "
                     f"{config.tie_tolerance}")
  num_classes = _num_classes(config.train)
  trials = [Trial(name, {"model": name}, {"depth": int(name[-2:]) if name[-2:].isdigit() else 0})
            for name in config.models]
  records = run_sweep(config.train, workdir, trials, trial, measurer(num_classes))
  curves = {t.name: _train_curve(trial_dir(workdir, i, t)) for i, t in enumerate(trials)}
  rows = summary_rows(records, DEGRADATION_COLUMNS + ["train_accuracy"])
  tail = config.curve_tail
  for row in rows:
    _, errors = curves[row["name"]]
    row["final_train_error"] = final_error(errors, tail) if errors else None
    row["test_error"] = None if row["accuracy"] is None else 1 - row["accuracy"]
  reports.plot_lines(workdir / "training_error.png",
                     curves,
                     "step", "training error (augmented batches)",
                     "Plain against residual networks")
  by_name = {r["name"]: r for r in rows}
  sections = ["![training error](training_error.png)", ""]

  def verdict(shallow, deep, family):
    a, b = by_name.get(shallow), by_name.get(deep)
    if not a or not b or a["final_train_error"] is None or b["final_train_error"] is None:
      return f"{family}: not all trials finished."
    return depth_verdict(family, shallow, deep, curves[shallow][1], curves[deep][1], tail,
                         config.tie_tolerance)

  plain = sorted((m for m in config.models if m.startswith("plain")), key=lambda m: int(m[5:]))
  residual = sorted((m for m in config.models if m.startswith("resnet")), key=lambda m: int(m[6:]))
  if len(plain) >= 2:
    sections.append("- " + verdict(plain[0], plain[-1], "Plain"))
  if len(residual) >= 2:
    sections.append("- " + verdict(residual[0], residual[-1], "Residual"))
  sections += ["", f"Training error is the mean over the last {tail} logged windows of "
               "training batches."]
  return _finish(workdir, f"{config.name}: {config.description}", rows, DEGRADATION_COLUMNS,
                 sections, command)


def final_error(errors: Sequence[float], tail: int) -> float:
  """The training error a run ends with: the mean of its last `tail` logged windows."""
  return sum(errors[-tail:]) / len(errors[-tail:])


def depth_verdict(family: str, shallow: str, deep: str, shallow_errors: list[float],
                  deep_errors: list[float], tail: int, tolerance: float) -> str:
  """Whether the deeper network of a family trains worse, in one sentence.

  Judged on the final training error (`final_error`). Final errors within
  `tolerance` of each other are a tie, and the sentence then compares the mean
  training error over the whole run, which tells which network converged faster.
  """
  final_shallow, final_deep = final_error(shallow_errors, tail), final_error(deep_errors, tail)
  ends = (f"{family}: the deeper {deep} ends with training error {_fmt_pct(final_deep)} against "
          f"{_fmt_pct(final_shallow)} for {shallow}")
  if abs(final_deep - final_shallow) > tolerance:
    return f"{ends} — the deeper network trains {'worse' if final_deep > final_shallow else 'better'}."
  mean_shallow = sum(shallow_errors) / len(shallow_errors)
  mean_deep = sum(deep_errors) / len(deep_errors)
  pace = "faster" if mean_deep < mean_shallow else "slower"
  return (f"{ends}, within {_fmt_pct(tolerance)}: no difference at the end of this budget. Over "
          f"the whole run the mean training error is {_fmt_pct(mean_deep)} against "
          f"{_fmt_pct(mean_shallow)}, so the deeper network converged {pace}.")


# -- depthwise-separable against standard convolutions ----------------------------------------

DEPTHWISE_COLUMNS = ["trial", "name", "model", "params", "flops", "accuracy", "train_seconds",
                     "status", "error"]


def block_cost_ratio(config, num_classes: int) -> dict:
  """Measured MACs of the separable blocks over their standard twins, and the 1/N + 1/k^2 theory."""
  separable_config = apply_overrides(config.train, {"model_overrides.separable": True})
  standard_config = apply_overrides(config.train, {"model_overrides.separable": False})
  size = config.train.data.image_size
  separable, standard = (_model_for(c, num_classes) for c in (separable_config, standard_config))
  rows_sep = analysis.summary(separable, (size, size, 3)).rows
  rows_std = analysis.summary(standard, (size, size, 3)).rows

  def per_block(rows):
    macs = {}
    for row in rows:
      if row.name.startswith("block"):
        block = row.name.split("/")[0]
        macs[block] = macs.get(block, 0) + row.macs
    return macs

  sep, std = per_block(rows_sep), per_block(rows_std)
  blocks = separable.blocks
  theory_num = sum((1 / b.out_features + 1 / b.kernel**2) * std[f"block{i}"]
                   for i, b in enumerate(blocks))
  total_std = sum(std.values())
  return {"measured_block_ratio": sum(sep.values()) / total_std,
          "theoretical_block_ratio": theory_num / total_std,
          "per_block": [{"block": i, "N": b.out_features, "k": b.kernel,
                         "measured": sep[f"block{i}"] / std[f"block{i}"],
                         "theory": 1 / b.out_features + 1 / b.kernel**2}
                        for i, b in enumerate(blocks)]}


def run_depthwise(config, workdir, trial, command) -> dict:
  num_classes = _num_classes(config.train)
  trials = [Trial("separable", {"model_overrides.separable": True}, {"convolution": "separable"}),
            Trial("standard", {"model_overrides.separable": False}, {"convolution": "standard"})]
  records = run_sweep(config.train, workdir, trials, trial, measurer(num_classes))
  rows = summary_rows(records, DEPTHWISE_COLUMNS)
  costs = block_cost_ratio(config, num_classes)
  (workdir / "cost_ratio.json").write_text(json.dumps(costs, indent=1))
  sep, std = rows
  sections = [
      f"Network FLOPs: separable {sep['flops'] / 1e6:.2f} M, standard {std['flops'] / 1e6:.2f} M "
      f"(ratio {sep['flops'] / std['flops']:.3f}); parameters {sep['params']:,} against "
      f"{std['params']:,} (ratio {sep['params'] / std['params']:.3f}).", "",
      f"In the {len(costs['per_block'])} convolution blocks, measured MACs ratio "
      f"{costs['measured_block_ratio']:.4f}; theory 1/N + 1/k^2 weighted by the standard "
      f"blocks' MACs {costs['theoretical_block_ratio']:.4f}.", "",
      f"Accuracy: separable {_fmt_pct(sep['accuracy'])}, standard {_fmt_pct(std['accuracy'])}.",
      "", reports.markdown_table(costs["per_block"], ["block", "N", "k", "measured", "theory"])]
  return _finish(workdir, f"{config.name}: {config.description}", rows, DEPTHWISE_COLUMNS,
                 sections, command)


# -- zoo: one short training per family --------------------------------------------------------

ZOO_COLUMNS = ["trial", "name", "model", "resolution", "params", "flops", "accuracy",
               "images_per_second", "train_seconds", "status", "error"]


def run_zoo(config, workdir, trial, command) -> dict:
  num_classes = _num_classes(config.train)
  trials = _config_trials(config)
  records = run_sweep(config.train, workdir, trials, trial, measurer(num_classes))
  rows = summary_rows(records, ZOO_COLUMNS)
  for row, record in zip(rows, records):
    row["images_per_second"] = (record.get("result") or {}).get("images_per_second")
  return _finish(workdir, f"{config.name}: {config.description}", rows, ZOO_COLUMNS, [], command)


KINDS: dict[str, Callable] = {
    "train": run_train,
    "sweep": run_plain_sweep,
    "efficientnet_scaling": run_efficientnet_scaling,
    "degradation": run_degradation,
    "depthwise": run_depthwise,
    "zoo": run_zoo,
}


def run(config: ml_collections.ConfigDict, workdir: pathlib.Path, trial: int | None = None,
        command: str = "", launcher=None) -> dict:
  """Runs experiment `config` in `workdir`: all of it under the workdir's lease, or one trial.

  `launcher` runs the sweeps' trials (default: here, in order; see `launch`). A
  `--trial K` run holds only that trial's lease, so several can share the workdir.
  """
  if config.kind not in KINDS:
    raise ValueError(f"unknown experiment kind {config.kind!r}; one of {sorted(KINDS)}")
  workdir = pathlib.Path(workdir)
  holding = lease.hold(workdir) if trial is None else contextlib.nullcontext()
  with holding, sweep.launching(launcher):
    return KINDS[config.kind](config, workdir, trial, command)
