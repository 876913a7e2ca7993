"""XLA:CPU compiler options against the default, on cnnjax training steps.

    python -m benchmarks.xla_flags [--models resnet18,mobilenet_v2] [--size 64] [--rounds 6]

Each option set is passed per compile (`compiled = jit(...).lower(...).compile(
compiler_options=...)`), so one process compares them all on the same machine
state, interleaved. The step is cnnjax's SGD training step at batch 16 with
the default convolution lowering, compiled from XLA's defaults ("default")
rather than cnnjax's own options ("cnnjax", `lowering.CPU_COMPILER_OPTIONS`).
Writes benchmarks/results/xla_flags.json.
"""

from __future__ import annotations

import argparse
import time

_YNN = "xla_cpu_experimental_ynn_fusion_type"

# Compared with "default" (XLA's own defaults) and "cnnjax" (lowering.CPU_COMPILER_OPTIONS).
OTHER_OPTION_SETS = {
    "ynn: dot, reduce": {_YNN: "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE"},
    "ynn: dot, reduce, eltwise": {
        _YNN: "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE,LIBRARY_FUSION_TYPE_ELTWISE"},
    "ynn: none": {_YNN: ""},
    "onednn": {"xla_cpu_use_onednn": True},
    "no xnnpack": {"xla_cpu_use_xnnpack": False},
    "xnn fusions": {"xla_cpu_experimental_xnn_fusion_type":
                    "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_ELTWISE,LIBRARY_FUSION_TYPE_REDUCE"},
    "xnn graph fusion": {"xla_cpu_experimental_xnn_graph_fusion_mode":
                         "XNN_GRAPH_FUSION_MODE_GREEDY"},
    "onednn fusions": {"xla_cpu_experimental_onednn_fusion_type":
                       "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_ELTWISE"},
    "fast math": {"xla_cpu_enable_fast_math": True},
}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default="resnet18,mobilenet_v2")
  parser.add_argument("--size", type=int, default=64)
  parser.add_argument("--rounds", type=int, default=6)
  args = parser.parse_args(argv)

  import jax
  import jax.numpy as jnp

  from benchmarks import common
  from cnnjax.models import lowering

  option_sets = {"default": {}, "cnnjax": dict(lowering.CPU_COMPILER_OPTIONS),
                 **OTHER_OPTION_SETS}

  rows = []
  for name in args.models.split(","):
    setup = common.sgd_training(name, args.size, 16, xla_options={})  # XLA's defaults
    state, batch = setup.state, setup.batch
    lowered = setup.train.lower(state, batch)
    compiled, compile_seconds, states = {}, {}, {}
    for label, options in option_sets.items():
      start = time.perf_counter()
      try:
        compiled[label] = lowered.compile(compiler_options=options)
      except Exception as error:  # noqa: BLE001 - an option this jaxlib rejects is a result too
        rows.append({"model": name, "options": label, "error": str(error)[:200]})
        continue
      compile_seconds[label] = time.perf_counter() - start
      states[label] = jax.tree.map(jnp.copy, state)
    def stepper(label):
      def step():
        states[label], metrics = compiled[label](states[label], batch)
        jax.block_until_ready(metrics)
      return step

    medians = common.interleaved({label: stepper(label) for label in compiled}, args.rounds,
                                 warmup=1)
    base = medians["default"]
    for label, median in medians.items():
      rows.append({"model": name, "size": args.size, "options": label,
                   "compiler_options": option_sets[label], "step_s": median,
                   "relative_to_default": median / base, "compile_s": compile_seconds[label]})
      print(f"{name:14s} {label:18s} {1e3 * median:7.1f} ms  x{median / base:.2f}  "
            f"compile {compile_seconds[label]:.1f}s", flush=True)
  path = common.write("xla_flags", {"command": "python -m benchmarks.xla_flags", "rows": rows})
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
