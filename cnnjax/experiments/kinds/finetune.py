"""`finetune`: pretrained weights against training from scratch, with the same budget.

The weights come from `config.init_from` (a torchvision/timm or cnnjax
`save_weights` file), or, when it is empty, from a first trial that trains
the same model on `config.pretrain` (training-config fields that differ,
nested like the training config: another dataset, budget) and exports its
final variables with `save_weights` into its own directory
(`trials/000-pretrain/pretrained.safetensors`), where they are one of its
records and travel with it through `sweep.merge_finished`. Then three trials
on the target data:
fine-tuning every layer, training the classifier only on the frozen body
(`freeze_body`, a linear probe), and the same network from a random init.
"""

from __future__ import annotations

import pathlib

import ml_collections

from cnnjax.experiments import common
from cnnjax.experiments.kinds import register
from cnnjax.experiments.sweep import (DONE, Trial, apply_overrides, run_sweep, summary_rows,
                                      trial_dir)

COLUMNS = ["trial", "name", "status", "start", "model", "resolution", "params", "flops",
           "accuracy", "train_accuracy", "train_seconds", "error"]
EXPORTED = "pretrained.safetensors"


def dotted(overrides, prefix: str = "") -> dict:
  """A nested config of training-config fields as dotted overrides: {"data.dataset": ...}."""
  flat = {}
  for key, value in overrides.items():
    if isinstance(value, (dict, ml_collections.ConfigDict)):
      flat.update(dotted(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def export_pretrained(train_config, trial_workdir: pathlib.Path, path: pathlib.Path) -> None:
  """The pretraining trial's final variables as a weights file (kept if it exists)."""
  import jax  # noqa: PLC0415
  import orbax.checkpoint as ocp  # noqa: PLC0415

  from cnnjax import weights  # noqa: PLC0415
  from cnnjax.train.config import model_overrides  # noqa: PLC0415

  if path.exists():
    return
  directory = trial_workdir / "checkpoints"
  steps = [int(p.name) for p in directory.glob("*") if p.name.isdigit()]
  if not steps:
    raise FileNotFoundError(
        f"{trial_workdir} is finished but has neither {path.name} nor checkpoints to export it "
        "from (merged without them?): copy its weights file there, or delete the trial's "
        "directory to pretrain again.")
  step = max(steps)
  with ocp.StandardCheckpointer() as checkpointer:
    state = checkpointer.restore(directory / str(step) / "state")
  variables = {"params": state["params"], "batch_stats": state.get("batch_stats", {})}
  weights.save_weights(train_config.model, jax.device_get(variables), path,
                       **model_overrides(train_config))


@register("finetune")
def run(config: ml_collections.ConfigDict, workdir: pathlib.Path, trial, command) -> dict:
  """Runs the experiment: pretrained weights fine-tuned, as a linear probe, and from scratch on the same budget.

  `config` is the experiment's ConfigDict, `workdir` its directory, `trial` a trial index
  to run alone (None: all, then the report), `command` the command line recorded in the
  report. Returns the summary written to `results.json`."""
  target_classes = common.num_classes(config.train)
  measure = common.measurer(target_classes)
  records, first = [], 0
  if config.init_from:
    source = pathlib.Path(config.init_from).expanduser()
    if not source.is_file():
      raise FileNotFoundError(f"config.init_from: no weights file at {source}")
    origin = f"`{source}`"
  else:
    pretrain = Trial("pretrain", dotted(config.pretrain), {"start": "random init"})
    pretrain_config = apply_overrides(config.train, pretrain.overrides)
    records = run_sweep(config.train, workdir, [pretrain], trial,
                        common.measurer(common.num_classes(pretrain_config)))
    first = 1
    pretrain_dir = trial_dir(workdir, 0, pretrain)
    source = pretrain_dir / EXPORTED
    if (workdir / EXPORTED).exists():  # where workdirs before 2026-12-05 keep it
      source = workdir / EXPORTED
    if records[0]["status"] == DONE:
      export_pretrained(pretrain_config, pretrain_dir, source)
    elif trial is None or trial >= 1:
      raise RuntimeError(f"the pretraining trial is {records[0]['status']}: the fine-tuning "
                         "trials need its weights. Run it (or --trial 0) first; "
                         f"{records[0].get('error') or ''}".rstrip())
    origin = f"trial 0 (`{', '.join(f'{k}={v}' for k, v in pretrain.overrides.items())}`)"
  trials = [Trial("finetune", {"init_from": str(source)}, {"start": "pretrained, all layers"}),
            Trial("linear_probe", {"init_from": str(source), "freeze_body": True},
                  {"start": "pretrained, classifier only"}),
            Trial("scratch", {}, {"start": "random init"})]
  records += run_sweep(config.train, workdir, trials, trial, measure, first_index=first)
  rows = summary_rows(records, COLUMNS)
  by_name = {r["name"]: r for r in rows}
  sections = [f"Weights: {origin}.", ""]
  finetuned, scratch = by_name["finetune"], by_name["scratch"]
  if finetuned["accuracy"] is not None and scratch["accuracy"] is not None:
    difference = finetuned["accuracy"] - scratch["accuracy"]
    sections.append(
        f"With the same budget, fine-tuning reaches {common.fmt_pct(finetuned['accuracy'])} "
        f"against {common.fmt_pct(scratch['accuracy'])} from scratch ({100 * difference:+.1f} "
        f"points); the classifier alone on the frozen body reaches "
        f"{common.fmt_pct(by_name['linear_probe']['accuracy'])}. One seed each: a difference "
        "of a point or two is within the spread of reruns.")
  return common.finish(workdir, f"{config.name}: {config.description}", rows, COLUMNS, sections,
                       command)
