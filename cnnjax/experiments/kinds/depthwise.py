"""`depthwise`: depthwise-separable against standard convolutions, cost and accuracy."""

from __future__ import annotations

import json

from cnnjax import analysis
from cnnjax.experiments import common, reports
from cnnjax.experiments.kinds import register
from cnnjax.experiments.sweep import Trial, apply_overrides, run_sweep, summary_rows

DEPTHWISE_COLUMNS = ["trial", "name", "model", "params", "flops", "accuracy", "train_seconds",
                     "status", "error"]


def block_cost_ratio(config, num_classes: int) -> dict:
  """Measured MACs of the separable blocks over their standard twins, and the 1/N + 1/k^2 theory."""
  separable_config = apply_overrides(config.train, {"model_overrides.separable": True})
  standard_config = apply_overrides(config.train, {"model_overrides.separable": False})
  size = config.train.data.image_size
  separable, standard = (common.model_for(c, num_classes) for c in (separable_config, standard_config))
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


@register("depthwise")
def run(config, workdir, trial, command) -> dict:
  """Runs the experiment: MobileNet v1 against its standard-convolution twin: parameters, FLOPs, accuracy, and the measured cost ratio against 1/N + 1/k^2.

  `config` is the experiment's ConfigDict, `workdir` its directory, `trial` a trial index
  to run alone (None: all, then the report), `command` the command line recorded in the
  report. Returns the summary written to `results.json`."""
  num_classes = common.num_classes(config.train)
  trials = [Trial("separable", {"model_overrides.separable": True}, {"convolution": "separable"}),
            Trial("standard", {"model_overrides.separable": False}, {"convolution": "standard"})]
  records = run_sweep(config.train, workdir, trials, trial, common.measurer(num_classes))
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
      f"Accuracy: separable {common.fmt_pct(sep['accuracy'])}, standard {common.fmt_pct(std['accuracy'])}.",
      "", reports.markdown_table(costs["per_block"], ["block", "N", "k", "measured", "theory"])]
  return common.finish(workdir, f"{config.name}: {config.description}", rows, DEPTHWISE_COLUMNS,
                 sections, command)
