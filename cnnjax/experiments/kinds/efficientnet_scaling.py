"""`efficientnet_scaling`: the compound-scaling grid search and scaling up, against single dimensions."""

from __future__ import annotations

from cnnjax.experiments import common, reports, scaling
from cnnjax.experiments.kinds import register
from cnnjax.experiments.sweep import DONE, apply_overrides, run_sweep, summary_rows

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


@register("efficientnet_scaling")
def run(config, workdir, trial, command) -> dict:
  base = _scaling_base(config)
  step1_points, candidates = scaling_plan(config)
  num_classes = common.num_classes(config.train)
  measure = common.measurer(num_classes)
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
  return common.finish(workdir, f"{config.name}: {config.description}", rows, SCALING_COLUMNS,
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
               f"{info['gamma']:.3f} (accuracy {common.fmt_pct(best['result']['top1'])}).", "",
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
    parts = [f"{m} {common.fmt_pct(r['accuracy'])} at {r['flops'] / 1e6:.1f} MFLOPs"
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
    judged.append(f"phi = {phi:g}: {best_method} ({common.fmt_pct(best_row['accuracy'])})")
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
