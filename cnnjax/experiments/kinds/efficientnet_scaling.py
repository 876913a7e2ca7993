"""`efficientnet_scaling`: the compound-scaling grid search and scaling up, against single dimensions.

Step 1 trains the base network and every grid candidate at phi = 1; step 2
scales the winner to each phi and, at the FLOPs each compound point
measures, networks scaled in width, depth or resolution alone. Every point
trains once per seed in `config.seeds`, and points are compared by their
mean test accuracy: a method "beats" another only where the gap exceeds both
points' standard deviations over the seeds.

Fair FLOPs: in `phi` mode every compound point is fitted to its target
(`target` x base FLOPs for the candidates, 2^phi x base FLOPs in step 2) by
the exponent applied to its coefficients (`scaling.fit_to_flops`), and the
baselines are bisected onto the compound point's FLOPs; all of them land
within `scaling.FLOPS_TOLERANCE` of the target or the sweep refuses to
start. The report shows every point's measured FLOPs against 2^phi, each
trial's training curve and final loss, and whether its loss had plateaued.

Budget: with `scaling.budget_check` the base also trains that many times
longer, and the report says whether that raised its test accuracy beyond the
seeds' spread, that is whether the stated budget is one in which the base has
plateaued.
"""

from __future__ import annotations

from cnnjax.experiments import common, reports, scaling
from cnnjax.experiments.kinds import register
from cnnjax.experiments.sweep import (DONE, Trial, apply_overrides, run_sweep, summary_rows,
                                      trial_dir)

TRIAL_COLUMNS = ["trial", "name", "point", "seed", "stage", "method", "alpha", "beta", "gamma",
                 "phi", "exponent", "width", "depth", "resolution", "params", "flops",
                 "accuracy", "train_accuracy", "final_train_loss", "loss_change_last_20pct",
                 "plateaued", "left_chance", "train_seconds", "status", "error"]
POINT_COLUMNS = ["method", "phi", "alpha", "beta", "gamma", "width", "depth", "resolution",
                 "flops_ratio", "seeds", "accuracy_mean", "accuracy_std", "plateaued"]


def _scaling_base(config) -> scaling.Base:
  s = config.scaling
  return scaling.Base(s.base_width, s.base_depth, s.base_resolution, s.min_resolution)


def scaling_plan(config) -> tuple[list[scaling.Point], list[tuple[float, float, float]]]:
  """The base point and the nominal step-1 candidates; validates everything before training."""
  s = config.scaling
  base = _scaling_base(config)
  if s.mode not in ("phi", "official"):
    raise scaling.ScalingConfigError(f"config.scaling.mode must be 'phi' or 'official', "
                                     f"got {s.mode!r}")
  if not s.phis or min(s.phis) < 1:
    raise scaling.ScalingConfigError(f"config.scaling.phis must be >= 1, got {tuple(s.phis)}")
  unknown = set(s.zero_init_methods) - {"width", "depth", "resolution"}
  if unknown:
    raise scaling.ScalingConfigError(
        f"config.scaling.zero_init_methods takes single-dimension baselines ('width', 'depth', "
        f"'resolution'), got {sorted(unknown)}")
  if s.zero_init_methods and not s.baselines:
    raise scaling.ScalingConfigError("config.scaling.zero_init_methods retrains baselines with "
                                     "zero-initialised residual branches; it needs "
                                     "config.scaling.baselines = True")
  if s.budget_check and not s.budget_check > 1:
    raise scaling.ScalingConfigError(
        f"config.scaling.budget_check must be 0 (off) or a factor above 1 on the training "
        f"budget, got {s.budget_check}")
  common.with_seeds([], config.seeds)
  candidates = scaling.grid_candidates(tuple(s.grid_alpha), tuple(s.grid_beta),
                                       tuple(s.grid_gamma), s.target, s.tolerance)
  base_point = scaling.Point("base", 0, 1.0, 1.0, 1.0, base.width, base.depth, base.resolution)
  step1 = [scaling.compound_point(base, a, b, g, 1.0) for a, b, g in candidates]
  later = [scaling.compound_point(base, a, b, g, phi) for a, b, g in candidates for phi in s.phis]
  if s.mode == "official":
    later += scaling.official_points(base, list(s.phis))
  scaling.check_resolution(base, [base_point, *step1, *later])
  return [base_point, *step1], candidates


def budget_trials(config, base_point: scaling.Point) -> list[Trial]:
  """The base again at `budget_check` x the training budget: does more training change it?"""
  factor = config.scaling.budget_check
  if not factor:
    return []
  trial = base_point.trial("budget")
  amount, unit = training_budget(config.train)
  key = "num_steps" if unit == "steps" else "num_epochs"
  longer = int(round(factor * amount)) if unit == "steps" else factor * amount
  return [Trial(trial.name, {**trial.overrides, key: longer}, {**trial.info, unit: longer})]


def training_budget(train_config) -> tuple[float, str]:
  """(amount, "steps" or "epochs"): what bounds a trial's training."""
  if train_config.num_steps:
    return train_config.num_steps, "steps"
  return train_config.num_epochs, "epochs"


def budget_verdict(base: list[float], longer: list[float], amount: float, factor: float,
                   unit: str = "epochs") -> list[str]:
  """Whether the stated budget is one in which the base has plateaued, judged on the seeds.

  The training loss under a cosine schedule falls through the schedule's last
  stretch at any budget (that is what annealing does), so the budget is judged
  the way it matters for the comparison: trained `factor` times longer, does
  the base reach a higher test accuracy beyond both spreads?
  """
  if not base or not longer:
    return []
  (mean, std), (long_mean, long_std) = common.spread(base), common.spread(longer)
  numbers = (f"{amount:g} {unit}: {common.fmt_pct(mean)} ± {common.fmt_pct(std)}; "
             f"{factor * amount:g} {unit}: {common.fmt_pct(long_mean)} ± "
             f"{common.fmt_pct(long_std)} ({len(base)} and {len(longer)} seeds)")
  if std is None or long_std is None:
    return [f"**Budget: not judged.** The base's test accuracy at {numbers}; one seed has no "
            "spread to judge the difference against.", ""]
  if common.compare(longer, base) == "higher":
    return [f"**Budget: not a plateau.** The base's test accuracy at {numbers}: {factor:g}x the "
            "training still helps beyond the seeds' spread, so every comparison below is at a "
            "budget where the networks are still learning.", ""]
  return [f"**Budget: the base has plateaued.** Its test accuracy at {numbers}: {factor:g}x the "
          "training changes nothing beyond the seeds' spread.", ""]


def _point_name(record: dict) -> str:
  return record["info"]["point"]


def _mean_accuracy(records: list[dict]) -> dict[str, float]:
  """Mean test accuracy of every point all of whose seeds finished."""
  by_point: dict[str, list] = {}
  for record in records:
    by_point.setdefault(_point_name(record), []).append(record)
  return {point: common.spread([r["result"]["top1"] for r in rs])[0]
          for point, rs in by_point.items() if all(r["status"] == DONE for r in rs)}


@register("efficientnet_scaling")
def run(config, workdir, trial, command) -> dict:
  """Runs the experiment: the grid search of alpha, beta, gamma at phi = 1, then compound against width-, depth- and resolution-only scaling at each phi, every point fitted to its FLOPs.

  `config` is the experiment's ConfigDict, `workdir` its directory, `trial` a trial index
  to run alone (None: all, then the report), `command` the command line recorded in the
  report. Returns the summary written to `results.json`."""
  base = _scaling_base(config)
  nominal, candidates = scaling_plan(config)
  num_classes = common.num_classes(config.train)
  measure = common.measurer(num_classes)
  s = config.scaling

  def flops_of(point: scaling.Point) -> float:
    return float(measure(apply_overrides(config.train, point.trial("probe").overrides))["flops"])

  base_point, *step1_points = nominal
  base_flops = flops_of(base_point)
  if s.mode == "phi":
    step1_points = [scaling.fit_to_flops(base, p.alpha, p.beta, p.gamma, 1.0,
                                         s.target * base_flops, flops_of) for p in step1_points]
  # The budget check last: a sweep that gained it keeps its trials' indices (their directories).
  step1 = common.with_seeds([base_point.trial("base"), *(p.trial("step1") for p in step1_points),
                             *budget_trials(config, base_point)], config.seeds)
  records = run_sweep(config.train, workdir, step1, trial, measure)

  accuracy = _mean_accuracy(records)
  step1_names = [p.trial("step1").name for p in step1_points]
  step2_records, best = [], None
  if all(name in accuracy for name in step1_names) and base_point.trial("base").name in accuracy:
    best = max(step1_points, key=lambda p: accuracy[p.trial("step1").name])
    points, twins = [], []
    if s.mode == "official":
      points += scaling.official_points(base, list(s.phis))
    else:
      for phi in s.phis:
        compound = (best if phi == 1 else scaling.fit_to_flops(
            base, best.alpha, best.beta, best.gamma, phi, 2.0**phi * base_flops, flops_of))
        if phi != 1:  # phi = 1 is step 1's winner, already trained
          points.append(compound)
        if s.baselines:
          target = flops_of(compound)
          for method in ("width", "depth", "resolution"):
            point = scaling.single_dimension_point(base, method, phi, target, flops_of)
            miss = flops_of(point) / target - 1
            if abs(miss) > scaling.FLOPS_TOLERANCE:
              raise scaling.ScalingConfigError(
                  f"{method}-only scaling at phi={phi} gets no closer than {100 * miss:+.1f}% "
                  "to the compound point's FLOPs; use a finer channel_divisor")
            points.append(point)
            if method in s.zero_init_methods:
              twins.append(point.zero_init_twin())
    # The twins last: a sweep that gained them keeps its trials' indices (their directories).
    points += twins
    scaling.check_resolution(base, points)
    step2 = common.with_seeds([p.trial("step2") for p in points], config.seeds)
    step2_records = run_sweep(config.train, workdir, step2, trial, measure,
                              first_index=len(step1))
  elif trial is not None and trial >= len(step1):
    raise ValueError(f"trial {trial} belongs to step 2, which needs every step-1 trial (0..."
                     f"{len(step1) - 1}) finished first")

  all_records = records + step2_records
  rows = summary_rows(all_records, TRIAL_COLUMNS)
  curves = {}
  for row, record in zip(rows, all_records, strict=True):
    curve = common.train_curve(trial_dir(workdir, record["index"], Trial(record["name"], {})))
    curves[row["name"]] = curve
    common.annotate_convergence(row, curve, tail=3, num_classes=num_classes)
  table = point_table(rows, base_flops)
  sections = _sections(config, workdir, rows, table, curves, best, candidates)
  sections += upsampling_note([p["resolution"] for p in table],
                              common.native_resolution(config.train))
  return common.finish(workdir, f"{config.name}: {config.description}", rows, TRIAL_COLUMNS,
                       sections, command)


def point_table(rows: list[dict], base_flops: float) -> list[dict]:
  """One row per point: its coefficients, FLOPs against the base, accuracy over seeds."""
  table = {}
  for row in rows:
    entry = table.setdefault(row["point"], {
        "point": row["point"], "stage": row["stage"], "method": row["method"],
        **{k: row[k] for k in ("phi", "alpha", "beta", "gamma", "width", "depth", "resolution")},
        "flops_ratio": row["flops"] / base_flops if row["flops"] else None,
        "accuracies": [], "plateau": []})
    if row["accuracy"] is not None:
      entry["accuracies"].append(row["accuracy"])
    if row["plateaued"] is not None:
      entry["plateau"].append(row["plateaued"])
  points = []
  for entry in table.values():
    mean, std = common.spread(entry.pop("accuracies"))
    flags = entry.pop("plateau")
    points.append({**entry, "seeds": sum(1 for r in rows if r["point"] == entry["point"]
                                         and r["accuracy"] is not None),
                   "accuracy_mean": mean, "accuracy_std": std,
                   "plateaued": f"{sum(flags)}/{len(flags)}"})
  return points


def _accuracies(rows: list[dict], point: str) -> list[float]:
  return [r["accuracy"] for r in rows if r["point"] == point and r["accuracy"] is not None]


def _sections(config, workdir, rows, table, curves, best, candidates) -> list[str]:
  s = config.scaling
  seeds = len(tuple(config.seeds))
  base_entry = next((p for p in table if p["stage"] == "base"), None)
  step1 = [p for p in table if p["stage"] == "step1"]
  sections = ["## Step 1: grid search at phi = 1", "",
              f"{len(candidates)} candidates with alpha*beta^2*gamma^2 within {s.tolerance} of "
              f"{s.target}; base network width {s.base_width}, depth {s.base_depth}, resolution "
              f"{s.base_resolution}; {seeds} seeds per point.", ""]
  if s.mode == "phi":
    sections += ["FLOPs are matched, not nominal: each candidate's exponent on (alpha, beta, "
                 f"gamma) is fitted so that its measured FLOPs are {s.target}x the base's within "
                 f"{100 * scaling.FLOPS_TOLERANCE:g}% (`exponent`), and each step-2 point to "
                 "2^phi x the base's; the baselines are bisected onto the compound point's FLOPs.",
                 ""]
  if step1:
    sections.append(reports.markdown_table(step1, POINT_COLUMNS))
    labels = [f"a{p['alpha']:.2f} b{p['beta']:.2f} g{p['gamma']:.2f}" for p in step1]
    reports.plot_bars(workdir / "grid_search.png", labels, [p["accuracy_mean"] for p in step1],
                      "test accuracy (mean ± std over seeds)", "Step 1: candidates at phi = 1",
                      errors=[p["accuracy_std"] for p in step1])
    sections += ["", "![grid search](grid_search.png)", ""]
  budget = next((p for p in table if p["stage"] == "budget"), None)
  if base_entry and budget:
    amount, unit = training_budget(config.train)
    sections += ["## Budget", "",
                 *budget_verdict(_accuracies(rows, base_entry["point"]),
                                 _accuracies(rows, budget["point"]), amount, s.budget_check, unit)]
  _plot_curves(workdir, rows, curves, best.trial("step1").name if best else None)
  sections += ["![training loss](training_loss.png)", ""]
  if best is None:
    sections += ["Step 2 waits for every step-1 trial to finish.", ""]
    return sections + _plateau_lines(rows)
  winner = best.trial("step1").name
  sections += [f"Chosen: alpha = {best.alpha:.3f}, beta = {best.beta:.3f}, gamma = "
               f"{best.gamma:.3f} (accuracy {common.fmt_spread(_accuracies(rows, winner))}).",
               "",
               "## Step 2: scaling up", ""]
  methods: dict[str, list[dict]] = {}
  for entry in table:
    if entry["stage"] == "step2" or entry["point"] == winner:
      method = "compound" if entry["point"] == winner else entry["method"]
      methods.setdefault(method, []).append(entry)
  series, spreads = {}, {}
  for method, entries in methods.items():
    ordered = ([base_entry] if base_entry else []) + sorted(entries, key=lambda p: p["phi"])
    series[method] = ([p["flops_ratio"] for p in ordered], [p["accuracy_mean"] for p in ordered])
    spreads[method] = [p["accuracy_std"] for p in ordered]
  reports.plot_lines(workdir / "accuracy_vs_flops.png", series, "FLOPs / base FLOPs",
                     "test accuracy (mean ± std over seeds)", "Accuracy against FLOPs",
                     logx=True, errors=spreads)
  ordered = sorted((p for ps in methods.values() for p in ps), key=lambda p: (p["phi"], p["method"]))
  sections += [reports.markdown_table(ordered, POINT_COLUMNS), "",
               "![accuracy against FLOPs](accuracy_vs_flops.png)", ""]
  by_method = {m: {p["phi"]: _accuracies(rows, p["point"]) for p in ps}
               for m, ps in methods.items()}
  sections += scaling_verdict(by_method, _accuracies(rows, base_entry["point"]) if base_entry
                              else [])
  growth = ", ".join(f"{p['flops_ratio']:.2f}x at phi = {p['phi']:g} (2^phi = {2 ** p['phi']:g})"
                     for p in sorted(methods.get("compound", []), key=lambda p: p["phi"])
                     if p["flops_ratio"])
  if growth:
    sections += [f"Measured FLOPs of the compound points relative to the base: {growth}.", ""]
  return sections + _plateau_lines(rows)


def upsampling_note(resolutions, native: int | None) -> list[str]:
  """Which resolutions read the data upsampled: more pixels and FLOPs, no finer detail."""
  above = sorted({r for r in resolutions if native and r > native})
  if not above:
    return []
  listed = ", ".join(f"{r} px" for r in above)
  return [f"The data are stored at {native} px: {listed} read them upsampled, which adds pixels "
          "and FLOPs but no finer detail than the stored images hold.", ""]


def scaling_verdict(by_method: dict[str, dict[float, list[float]]],
                    base: list[float]) -> list[str]:
  """Sentences judged against the seeds' spread.

  First whether each single dimension beats the base at phi = 1 (the premise:
  on data where one dimension does not help, compound scaling cannot win
  through it); then, at each phi, whether compound scaling beats each baseline.
  """
  lines = []
  if base:
    premise = []
    for method in _baselines(by_method):
      at_one = by_method.get(method, {}).get(1)
      if at_one:
        outcome = common.compare(at_one, base)
        premise.append(f"{method} {'beats' if outcome == 'higher' else 'does not beat'} the "
                       f"base ({common.fmt_spread(at_one)} against {common.fmt_spread(base)})")
    if premise:
      lines += ["At phi = 1, " + "; ".join(premise) + ".", ""]
  compound = by_method.get("compound", {})
  for phi in sorted(compound):
    parts = []
    for method in _baselines(by_method):
      rival = by_method.get(method, {}).get(phi)
      if not rival or not compound[phi]:
        continue
      outcome = common.compare(compound[phi], rival)
      word = {"higher": "beats", "lower": "loses to", "tie": "ties with"}[outcome]
      parts.append(f"{word} {method} ({common.fmt_spread(rival)})")
    if parts:
      lines.append(f"- phi = {phi:g}: compound ({common.fmt_spread(compound[phi])}) "
                   + ", ".join(parts) + ".")
  if lines and compound:
    lines += [""]
  lines += zero_init_verdict(by_method, base)
  if lines:
    lines += ["\"Beats\" and \"loses to\" mean a gap larger than both points' standard "
              "deviations over the seeds; anything smaller is a tie.", ""]
  return lines


def _baselines(by_method: dict) -> list[str]:
  """The single-dimension methods present, each followed by its zero-init twin."""
  order = [m for single in ("width", "depth", "resolution")
           for m in (single, single + scaling.ZERO_INIT_SUFFIX)]
  return [m for m in order if m in by_method]


def zero_init_verdict(by_method: dict[str, dict[float, list[float]]],
                      base: list[float]) -> list[str]:
  """What zero-initialised residual branches change for each retrained baseline, per phi.

  The first sentence is the cross-framework finding that motivated the twins:
  the deepest depth-only network, exported with `save_weights` and trained in
  timm from the same weights on the same batches, trains no better there
  (`benchmarks/depth_parity.py`, BENCHMARKS.md), so its failure is this
  network's initialisation at this recipe, not a cnnjax defect.
  """
  twins = sorted(m for m in by_method if m.endswith(scaling.ZERO_INIT_SUFFIX))
  if not twins:
    return []
  lines = ["## Zero-initialised residual branches", "",
           "Depth-only scaling of this width-0.25 base puts 4-6 channel stages behind up to 14 "
           "residual blocks each. The same network, exported with `save_weights` and trained in "
           "PyTorch (timm's EfficientNet) from the same weights on the same batches with the same "
           "optimizer, ends no better there (`benchmarks/depth_parity.py`, BENCHMARKS.md): the "
           "framework is not the cause. The twins below differ only in `zero_init_residual`: "
           "the last BatchNorm scale of every residual block starts at 0, so each deeper network "
           "starts as the shallower one (Goyal et al. 2017). The base, compound, width- and "
           "resolution-only networks (depth 0.25) have no residual block, so zero-init would "
           "leave them unchanged and they were not retrained.", ""]
  word = {"higher": "beats", "lower": "loses to", "tie": "ties with"}
  for twin in twins:
    plain = twin[:-len(scaling.ZERO_INIT_SUFFIX)]
    for phi in sorted(by_method[twin]):
      ours = by_method[twin][phi]
      if not ours:
        continue
      parts = []
      if by_method.get(plain, {}).get(phi):
        rival = by_method[plain][phi]
        parts.append(f"{word[common.compare(ours, rival)]} {plain} without it "
                     f"({common.fmt_spread(rival)})")
      if base:
        parts.append(f"{word[common.compare(ours, base)]} the base ({common.fmt_spread(base)})")
      lines.append(f"- phi = {phi:g}: {twin} ({common.fmt_spread(ours)}) " + ", ".join(parts)
                   + ".")
  return lines + [""]


def _plateau_lines(rows: list[dict]) -> list[str]:
  sentence = common.plateau_sentence(rows)
  return [sentence, ""] if sentence else []


CURVE_COLORS = {"base": "0.45", "base, 2x budget": "C4", "compound": "C0", "width": "C1",
                "depth": "C2", "resolution": "C3", "depth_zero_init": "C5",
                "width_zero_init": "C6", "resolution_zero_init": "C7"}


def curve_panels(rows: list[dict], curves: dict, winner: str | None) -> dict[str, dict]:
  """Training-loss series by panel: the step-1 candidates, the budget check, and each phi of
  step 2 (the step-1 winner is compound at phi = 1); the base's seeds in every panel. Seeds of
  one point share a colour ("_" labels)."""
  def panel_of(row) -> tuple[str, str] | None:
    if row["stage"] == "step1":
      label = f"({row['alpha']:g}, {row['beta']:g}, {row['gamma']:g})"
      return "step 1: candidates at phi = 1", label
    if row["stage"] == "budget":
      return "budget check", "base, 2x budget"
    if row["stage"] == "step2":
      return f"step 2: phi = {row['phi']:g}", row["method"]
    return None

  grouped: dict[str, list[tuple[str, dict, dict]]] = {}
  for row in rows:
    placed = panel_of(row)
    if placed:
      grouped.setdefault(placed[0], []).append((placed[1], row, curves.get(row["name"])))
    if row["point"] == winner:
      grouped.setdefault("step 2: phi = 1", []).append(("compound", row, curves.get(row["name"])))
  base = [("base", row, curves.get(row["name"])) for row in rows if row["stage"] == "base"]
  panels = {}
  for name in sorted(grouped, key=lambda n: (not n.startswith("step 1"), n != "budget check", n)):
    series, last_point = {}, None
    for label, row, curve in base + sorted(grouped[name], key=lambda e: e[0] != "compound"):
      if not curve or not curve["step"]:
        continue
      key = label if row["point"] != last_point else f"_{row['name']}"
      last_point = row["point"]
      series[key] = (curve["step"], curve["loss"])
    panels[name] = series
  return panels


def _plot_curves(workdir, rows, curves, winner) -> None:
  reports.plot_panels(workdir / "training_loss.png", curve_panels(rows, curves, winner), "step",
                      "training loss", "Training loss of every trial (each seed a line)",
                      logy=True, colors=CURVE_COLORS)
