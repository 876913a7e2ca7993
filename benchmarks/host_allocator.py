"""What `import cnnjax`'s allocator settings do in a plain process: faults per step, first-step time.

    python -m benchmarks.host_allocator [--rounds 3] [--variants 'default;off']

Each measurement is a fresh Python process (`cnnjax.host_allocator.PROBE`) written as a
user would write it:
`import jax, jax.numpy as jnp, optax`, then `import cnnjax`, then the user's own
`jax.jit` SGD step of a cnnjax model (no cnnjax training code). Variants, as
environment: `default` (nothing set: cnnjax applies its settings at import), `off`
(`CNNJAX_HOST_ALLOCATOR=0`), and candidates given as `name=MALLOC_X=v,...`
(glibc reads those at start; with any MALLOC_* set cnnjax leaves the allocator alone).
- faults: MobileNet v2 at 128 px, batch 16: minor page faults (getrusage) and the
  median over 6 steps after 3 of warm-up;
- first step: ResNet-18 and EfficientNet-B0 at 64 px, batch 16: the seconds from the
  first call (trace, compile, run) to its result. JAX's persistent cache is off.
Variants interleave round by round. Writes benchmarks/results/host_allocator.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

from benchmarks import common
from cnnjax import host_allocator

CASES = (("faults", "mobilenet_v2", 128, 6), ("first_step", "resnet18", 64, 1),
         ("first_step", "efficientnet_b0", 64, 1))


def _variant_env(spec: str) -> tuple[str, dict]:
  base = host_allocator.without_settings(os.environ)
  base["JAX_ENABLE_COMPILATION_CACHE"] = "false"
  if spec == "default":
    return spec, base
  if spec == "off":
    return spec, {**base, "CNNJAX_HOST_ALLOCATOR": "0"}
  name, _, settings = spec.partition("=")
  return name, {**base, **dict(s.split("=", 1) for s in settings.split(","))}


def measure(spec: str, model: str, size: int, steps: int) -> dict:
  return host_allocator.probe(_variant_env(spec)[1], model, size, steps)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--variants", default="default;off",
                      help="';'-separated: default, off, or NAME=MALLOC_X=v,MALLOC_Y=w")
  args = parser.parse_args(argv)
  specs = [s.strip() for s in args.variants.split(";") if s.strip()]
  runs: dict = {}
  for round_ in range(args.rounds):
    for kind, model, size, steps in CASES:
      for spec in specs:
        name = _variant_env(spec)[0]
        result = measure(spec, model, size, steps)
        runs.setdefault(f"{model}@{size}", {}).setdefault(name, []).append(result)
        print(round_, model, size, name, result, flush=True)
  summary = {case: {name: {"first_step_s": [r["first_step_s"] for r in results],
                           "faults_per_step": [r["faults_per_step"] for r in results],
                           "step_s": [r["step_s"] for r in results],
                           "state": results[0]["state"]}
                    for name, results in variants.items()}
             for case, variants in runs.items()}
  ratios = {}
  for case, variants in summary.items():
    if "off" in variants:
      off = statistics.median(variants["off"]["first_step_s"])
      ratios[case] = {name: statistics.median(v["first_step_s"]) / off
                      for name, v in variants.items()}
  payload = {"rounds": args.rounds, "runs": summary, "first_step_over_off": ratios}
  print(json.dumps(ratios, indent=1))
  print(common.write("host_allocator", payload))


if __name__ == "__main__":
  main()
