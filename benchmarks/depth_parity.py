"""The scaling sweep's deepest depth-only network trained in cnnjax and in timm, same start.

    python -m benchmarks.depth_parity [--steps 100] [--depth 3.5046]

The efficientnet_scaling sweep's depth-only point at phi = 3 (width 0.25,
whole channels, depth 3.5046: 61 blocks) is initialised in cnnjax, written
with `save_weights` and loaded strictly into timm's EfficientNet
(`_gen_efficientnet`, TF padding, the same BatchNorm constants). Both train on
the same batches from cnnjax's own pipeline (the sweep's data and
augmentation) with the sweep's AdamW recipe (learning rate 3e-3 with its
warmup and cosine shape over its 10 epochs, of which the first `--steps` steps
run; decoupled decay 0.02 on kernels only), dropout off on
both sides so that they compute the same function. A third run is cnnjax with
`zero_init_residual`. Recorded: the training loss (mean of the last 10% of
steps) and the median step time of each, one process on the cores it is given
(run it under `taskset -c 0` for one core), interleaved step by step.
Writes benchmarks/results/depth_parity.json.
"""

from __future__ import annotations

import argparse
import copy
import functools
import pathlib
import tempfile
import time

import numpy as np

from benchmarks import common


def _config(depth: float, zero_init: bool, steps: int):
  from experiments.configs import efficientnet_scaling

  config = efficientnet_scaling.get_config().train
  config.model_overrides.depth = depth
  config.model_overrides.dropout = 0.0
  if zero_init:
    config.model_overrides.zero_init_residual = True
  return config  # its whole schedule; the first `steps` steps of it run


def _timm_model(width: float, depth: float, num_classes: int):
  """timm's EfficientNet at whole channels. timm rounds an inverted residual's expanded width
  to a multiple of 8 whatever `channel_divisor` says; cnnjax (and the TF original at divisor 1)
  rounds it to the nearest channel, so timm's rounding follows the divisor while it builds; and
  the squeeze width is floored from the block's input channels, as the TF original (timm
  rounds)."""
  from timm.models import _efficientnet_blocks as blocks
  from timm.models import efficientnet as timm_efficientnet

  original = blocks.make_divisible
  blocks.make_divisible = lambda v, divisor=1, *args, **kwargs: original(v, 1, *args, **kwargs)
  try:
    return timm_efficientnet._gen_efficientnet(
        "tf_efficientnet_b0", channel_multiplier=width, depth_multiplier=depth,
        channel_divisor=1, bn_eps=1e-3, pad_type="same", drop_rate=0.0, drop_path_rate=0.0,
        num_classes=num_classes,
        se_layer=functools.partial(blocks.SqueezeExcite,
                                   rd_round_fn=lambda x: max(1, int(x + 1e-6))))
  finally:
    blocks.make_divisible = original


def run(steps: int, depth: float) -> dict:
  import jax
  import jax.numpy as jnp
  import safetensors.torch
  import torch

  from cnnjax import registry, weights
  from cnnjax.train import config as config_lib
  from cnnjax.train import loop, steps as steps_lib

  torch.set_num_threads(1)
  plain = loop.build(_config(depth, False, steps))
  batches = [plain.train_batches(step) for step in range(steps)]
  name, overrides = "efficientnet", config_lib.model_overrides(_config(depth, False, steps))
  state = steps_lib.init_state(plain.model, plain.tx, plain.image_shape, seed=0)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  with tempfile.TemporaryDirectory() as directory:
    path = weights.save_weights(name, jax.device_get(variables),
                                pathlib.Path(directory) / "start.safetensors", **overrides)
    reference = _timm_model(overrides["width"], depth, plain.num_classes)
    reference.load_state_dict(safetensors.torch.load_file(str(path)), strict=True)
  for module in reference.modules():  # the TF original's BatchNorm momentum, as cnnjax
    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
      module.momentum = 0.01

  # cnnjax: its own compiled step, from the same start; with zero-init, its own start.
  runs = {}
  for label, zero_init in (("cnnjax", False), ("cnnjax_zero_init", True)):
    built = plain if not zero_init else loop.build(_config(depth, True, steps))
    start = state if not zero_init else steps_lib.init_state(built.model, built.tx,
                                                             built.image_shape, seed=0)
    step = jax.jit(functools.partial(steps_lib.train_step, model=built.model, tx=built.tx,
                                     config=steps_lib.StepConfig(), schedule=built.schedule),
                   donate_argnums=0)
    runs[label] = {"state": start, "step": step.lower(start, batches[0]).compile(),
                   "losses": [], "seconds": []}

  decay = [p for p in reference.parameters() if p.ndim > 1]
  rest = [p for p in reference.parameters() if p.ndim <= 1]
  o = _config(depth, False, steps).optimizer
  optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                 {"params": rest, "weight_decay": 0.0}],
                                lr=o.learning_rate, eps=1e-8)
  lr_shape = torch.optim.lr_scheduler.LambdaLR(optimizer,
                                               lambda k: float(plain.schedule(jnp.asarray(k))))
  reference.train()
  torch_losses, torch_seconds = [], []
  for index, batch in enumerate(batches):
    for label, entry in runs.items():
      started = time.perf_counter()
      entry["state"], metrics = entry["step"](entry["state"], batch)
      entry["losses"].append(float(metrics["data_loss"]))
      entry["seconds"].append(time.perf_counter() - started)
    started = time.perf_counter()
    optimizer.zero_grad()
    images = torch.from_numpy(np.ascontiguousarray(batch["image"].transpose(0, 3, 1, 2)))
    loss = torch.nn.functional.cross_entropy(reference(images),
                                             torch.from_numpy(batch["label"]).long())
    loss.backward()
    optimizer.step()
    lr_shape.step()
    torch_losses.append(float(loss.detach()))
    torch_seconds.append(time.perf_counter() - started)
    if index % 20 == 0:
      print(f"step {index}: cnnjax {runs['cnnjax']['losses'][-1]:.3f}, timm {torch_losses[-1]:.3f},"
            f" cnnjax zero-init {runs['cnnjax_zero_init']['losses'][-1]:.3f}", flush=True)

  tail = max(1, steps // 10)
  results = {label: {"final_loss": float(np.mean(e["losses"][-tail:])),
                     "median_step_seconds": float(np.median(e["seconds"][1:])),
                     "losses": e["losses"]} for label, e in runs.items()}
  results["timm"] = {"final_loss": float(np.mean(torch_losses[-tail:])),
                     "median_step_seconds": float(np.median(torch_seconds[1:])),
                     "losses": torch_losses}
  model = registry.create_model(name, num_classes=plain.num_classes, **overrides)
  return {"machine": common.machine(), "steps": steps, "depth": depth,
          "blocks": len(model.blocks), "batch_size": plain.train_batches.global_batch,
          "image_size": plain.image_shape[0],
          "parameters": int(sum(np.size(x) for x in jax.tree.leaves(state.params))),
          "step_time_ratio_cnnjax_over_timm": (results["cnnjax"]["median_step_seconds"]
                                               / results["timm"]["median_step_seconds"]),
          "runs": results}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=100)
  parser.add_argument("--depth", type=float, default=3.5046)
  args = parser.parse_args()
  payload = run(args.steps, args.depth)
  for label, entry in payload["runs"].items():
    print(f"{label}: final loss {entry['final_loss']:.3f}, "
          f"{entry['median_step_seconds']:.3f} s/step")
  print(f"cnnjax / timm step time: {payload['step_time_ratio_cnnjax_over_timm']:.2f}")
  print(common.write("depth_parity", payload))


if __name__ == "__main__":
  main()
