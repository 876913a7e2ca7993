"""Training and inference step time of cnnjax against torchvision (PyTorch eager) on CPU.

    make bench                       # installs torch + torchvision, then runs this
    python -m benchmarks.train_step [--models resnet18,...] [--sizes 64,128] [--rounds 12]

For each model and input size, batch 16 and 10 classes:
- the training step: forward, softmax cross-entropy, backward, SGD with
  momentum 0.9 (cnnjax: one compiled `jax.jit` step from `cnnjax.train.steps`,
  state donated; PyTorch: `model.train()`, `loss.backward()`, `optimizer.step()`);
- inference: the forward pass in eval mode (PyTorch under `inference_mode`).

With `--plain_xla` (the default) the same cnnjax steps traced with plain XLA
convolutions (`cnnjax.models.lowering.use("xla")`) are timed as well, which
shows what the CPU lowering buys. Runs are interleaved (one cnnjax step, one PyTorch step, repeated) so both see
the same machine state; the medians are compared as a ratio cnnjax/PyTorch.
Achieved FLOP/s use cnnjax's own FLOP count of the forward pass (training is
counted as 3x forward) and are given as a fraction of the measured float32
matmul peak. Compile time of cnnjax's training step is measured in fresh
subprocesses: cold (empty compilation cache) and warm (the same cache again).
Writes benchmarks/results/train_step.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]
MODELS = ("resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0", "densenet121")
SIZES = (64, 128)
BATCH = 16
CLASSES = 10


def _jax_steps(name: str, size: int, mode: str = "auto"):
  """Compiled train and inference steps; `mode` "xla" traces the plain XLA convolutions."""
  import jax

  from benchmarks import common
  from cnnjax import analysis
  from cnnjax.models import lowering

  setup = common.sgd_training(name, size, BATCH, CLASSES)
  model, images = setup.model, setup.batch["image"]
  infer = jax.jit(lambda s, x: model.apply({"params": s.params, "batch_stats": s.batch_stats},
                                           x, train=False),
                  compiler_options=lowering.compiler_options(jax.default_backend()))
  with lowering.use(mode):  # tracing happens at lowering, so the mode applies here
    train = setup.train.lower(setup.state, setup.batch).compile()
    infer = infer.lower(setup.state, images).compile()
  holder = {"state": setup.state}

  def train_once():
    holder["state"], metrics = train(holder["state"], setup.batch)
    jax.block_until_ready(metrics)

  def infer_once():
    jax.block_until_ready(infer(holder["state"], images))

  return train_once, infer_once, analysis.flops(model, size)


def _user_jit_steps(name: str, size: int):
  """A notebook user's own steps: plain `jax.jit`, optax SGD, no compiler options.

  The same model, loss and optimizer as cnnjax's step, written as a user would,
  to show that `import cnnjax` alone makes them as fast (`cnnjax.xla_cpu`).
  """
  import jax
  import jax.numpy as jnp
  import optax

  import cnnjax

  model = cnnjax.create_model(name, num_classes=CLASSES)
  images = jax.random.normal(jax.random.key(0), (BATCH, size, size, 3))
  labels = jnp.arange(BATCH) % CLASSES
  variables = jax.jit(model.init)(jax.random.key(1), images[:1])
  tx = optax.sgd(0.01, momentum=0.9)
  holder = {"state": (variables["params"], variables["batch_stats"], tx.init(variables["params"]))}

  @functools.partial(jax.jit, donate_argnums=0)
  def train(state, images, labels):
    params, batch_stats, opt_state = state

    def loss_fn(params):
      logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, images,
                                    train=True, mutable=["batch_stats"],
                                    rngs={"dropout": jax.random.key(2)})
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates

    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    changes, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, changes), updates["batch_stats"], opt_state), loss

  infer = jax.jit(lambda params, batch_stats, x: model.apply(
      {"params": params, "batch_stats": batch_stats}, x, train=False))

  def train_once():
    holder["state"], loss = train(holder["state"], images, labels)
    jax.block_until_ready(loss)

  def infer_once():
    params, batch_stats, _ = holder["state"]
    jax.block_until_ready(infer(params, batch_stats, images))

  return train_once, infer_once


def _torch_steps(name: str, size: int):
  import torch
  import torchvision

  torch.manual_seed(0)
  model = getattr(torchvision.models, name)(num_classes=CLASSES)
  optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
  loss_fn = torch.nn.CrossEntropyLoss()
  images = torch.randn(BATCH, 3, size, size)
  labels = torch.arange(BATCH) % CLASSES

  def train_once():
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(model(images), labels)
    loss.backward()
    optimizer.step()

  def infer_once():
    model.eval()
    with torch.inference_mode():
      model(images)

  return train_once, infer_once


def matmul_peak(repeats: int = 10, n: int = 2048) -> dict:
  """float32 GFLOP/s of a large square matmul, in JAX and in PyTorch."""
  import jax
  import jax.numpy as jnp
  import torch

  from benchmarks import common

  a = jax.random.normal(jax.random.key(0), (n, n))
  dot = jax.jit(jnp.dot)
  ta = torch.randn(n, n)
  medians = common.interleaved({"jax": lambda: jax.block_until_ready(dot(a, a)),
                                "torch": lambda: torch.mm(ta, ta)}, repeats, warmup=1)
  flop = 2 * n**3
  return {"n": n, "jax_gflops": flop / medians["jax"] / 1e9,
          "torch_gflops": flop / medians["torch"] / 1e9}


_COMPILE_CHILD = """
import json, sys, time
import jax
jax.config.update("jax_compilation_cache_dir", sys.argv[2])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
from benchmarks import common
from cnnjax.train import step_cache
name, size, through_step_cache = sys.argv[1], int(sys.argv[3]), sys.argv[4] == "1"
setup = common.sgd_training(name, size, 16)
start = time.perf_counter()
if through_step_cache:
  _, loaded = step_cache.load_or_compile(
      setup.train, (setup.state, setup.batch), compiler_options={},
      description={"benchmark": "common.sgd_training", "model": name, "size": size})
  print(json.dumps({"total_s": time.perf_counter() - start, "loaded": loaded}))
else:
  lowered = setup.train.lower(setup.state, setup.batch)
  traced = time.perf_counter()
  lowered.compile()
  done = time.perf_counter()
  print(json.dumps({"trace_s": traced - start, "compile_s": done - traced,
                    "total_s": done - start}))
"""


def compile_times(name: str, size: int) -> dict:
  """The training step's compile, each in a fresh process sharing one cache directory.

  cold: empty caches, tracing and compiling; warm_jax_cache: JAX's compilation cache
  is warm but the step is traced again; warm: cnnjax's step cache (`cnnjax.train.step_cache`,
  what the training loop uses) finds the step without tracing it.
  """
  def child(cache, through_step_cache):
    from cnnjax import host_allocator  # noqa: PLC0415

    # Opted out of the allocator settings: with them a step whose temporaries exceed one heap
    # (this one's do) cannot be serialised, and compiles afresh in each process.
    env = {**host_allocator.without_settings(os.environ), host_allocator.ENV_OPT_OUT: "0"}
    out = subprocess.run([sys.executable, "-c", _COMPILE_CHILD, name, cache, str(size),
                          "1" if through_step_cache else "0"],
                         check=True, capture_output=True, text=True, cwd=REPO, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])

  with tempfile.TemporaryDirectory() as cache:
    results = {"cold": child(cache, False), "warm_jax_cache": child(cache, False)}
    results["step_cache_fill"] = child(cache, True)  # a miss: writes the entry
    results["warm"] = child(cache, True)
  if not results["warm"]["loaded"]:
    raise RuntimeError("the step cache missed on an unchanged step: its key is not stable")
  return results


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default=",".join(MODELS))
  parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
  parser.add_argument("--rounds", type=int, default=10)
  parser.add_argument("--compile_model", default="resnet50")
  parser.add_argument("--output", default="train_step")
  parser.add_argument("--user_jit", action=argparse.BooleanOptionalAction, default=True,
                      help="also time a plain jax.jit step written as a user would")
  parser.add_argument("--plain_xla", action=argparse.BooleanOptionalAction, default=True,
                      help="also time cnnjax with plain XLA convolutions (lowering.use('xla'))")
  args = parser.parse_args(argv)

  import torch

  from benchmarks import common
  from cnnjax import host_allocator, xla_cpu
  from cnnjax.models import tuning

  peak = matmul_peak()
  print(f"matmul peak: jax {peak['jax_gflops']:.0f} GFLOP/s, torch {peak['torch_gflops']:.0f} GFLOP/s",
        flush=True)
  rows = []
  for name in args.models.split(","):
    for size in map(int, args.sizes.split(",")):
      jax_train, jax_infer, forward_flops = _jax_steps(name, size)
      torch_train, torch_infer = _torch_steps(name, size)
      steps_to_time = {"jax_train": jax_train, "torch_train": torch_train,
                       "jax_infer": jax_infer, "torch_infer": torch_infer}
      if args.user_jit:
        user_train, user_infer = _user_jit_steps(name, size)
        steps_to_time.update(user_train=user_train, user_infer=user_infer)
      if args.plain_xla:
        plain_train, plain_infer, _ = _jax_steps(name, size, mode="xla")
        steps_to_time.update(xla_train=plain_train, xla_infer=plain_infer)
      times = common.interleaved_times(steps_to_time, args.rounds)
      medians = common.medians(times)
      row = {"model": name, "size": size, "batch": BATCH, "forward_gflop": forward_flops / 1e9,
             **{f"{key}_s": value for key, value in medians.items()}}
      for mode, flop in (("train", 3 * forward_flops), ("infer", forward_flops)):
        row[f"{mode}_ratio"] = medians[f"jax_{mode}"] / medians[f"torch_{mode}"]
        # Paired rounds: how often cnnjax was the faster of the two steps timed back to back.
        row[f"{mode}_rounds_cnnjax_faster"] = sum(
            j < t for j, t in zip(times[f"jax_{mode}"], times[f"torch_{mode}"]))
        row[f"{mode}_rounds"] = args.rounds
        if args.plain_xla:
          row[f"xla_{mode}_ratio"] = medians[f"xla_{mode}"] / medians[f"torch_{mode}"]
        if args.user_jit:  # a plain jax.jit against cnnjax's own step
          row[f"user_{mode}_over_cnnjax"] = medians[f"user_{mode}"] / medians[f"jax_{mode}"]
        for lib in ("jax", "torch"):
          rate = BATCH * flop / medians[f"{lib}_{mode}"]
          row[f"{lib}_{mode}_peak_fraction"] = rate / (peak["jax_gflops"] * 1e9)
      rows.append(row)
      print(f"{name:16s} {size:4d}  train {row['jax_train_s']:.3f}s vs {row['torch_train_s']:.3f}s "
            f"(x{row['train_ratio']:.2f}, {row['jax_train_peak_fraction']:.0%} of peak)  "
            f"infer {row['jax_infer_s']:.3f}s vs {row['torch_infer_s']:.3f}s "
            f"(x{row['infer_ratio']:.2f}); cnnjax faster in {row['train_rounds_cnnjax_faster']} "
            f"and {row['infer_rounds_cnnjax_faster']} of {args.rounds} rounds"
            + (f"; own jax.jit/cnnjax train x{row['user_train_over_cnnjax']:.2f}, infer "
               f"x{row['user_infer_over_cnnjax']:.2f}" if args.user_jit else ""), flush=True)
  compile_record = None
  if args.compile_model:
    compile_record = {"model": args.compile_model, "size": 224,
                      **compile_times(args.compile_model, 224)}
    print(f"compile {args.compile_model}@224: {compile_record}", flush=True)
  path = common.write(args.output, {
      "command": "python -m benchmarks.train_step " + " ".join(argv or sys.argv[1:]),
      "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
      "xla_flags": os.environ.get("XLA_FLAGS", ""), "cnnjax_xla_cpu": xla_cpu.state(),
      "host_allocator": host_allocator.state(),
      "tuning": tuning.describe(), "matmul_peak": peak, "rows": rows,
      "compile": compile_record})
  print(f"wrote {path}\n")
  print(markdown(rows))


def markdown(rows: list[dict]) -> str:
  """The table BENCHMARKS.md shows."""
  def optional(r, key):
    return f"{r[key]:.2f}" if key in r else "-"

  lines = ["| model | size | train cnnjax | train PyTorch | ratio | ratio, plain XLA | "
           "own jax.jit / cnnjax | cnnjax % of peak | infer cnnjax | infer PyTorch | ratio | "
           "ratio, plain XLA | own jax.jit / cnnjax |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(
        f"| {r['model']} | {r['size']} | {1e3 * r['jax_train_s']:.0f} ms | "
        f"{1e3 * r['torch_train_s']:.0f} ms | **{r['train_ratio']:.2f}** | "
        f"{optional(r, 'xla_train_ratio')} | {optional(r, 'user_train_over_cnnjax')} | "
        f"{100 * r['jax_train_peak_fraction']:.0f}% | {1e3 * r['jax_infer_s']:.0f} ms | "
        f"{1e3 * r['torch_infer_s']:.0f} ms | **{r['infer_ratio']:.2f}** | "
        f"{optional(r, 'xla_infer_ratio')} | {optional(r, 'user_infer_over_cnnjax')} |")
  return "\n".join(lines)


if __name__ == "__main__":
  main()
