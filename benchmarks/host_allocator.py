"""What `import cnnjax`'s allocator settings do in a plain process: faults per step, first-step time.

    python -m benchmarks.host_allocator [--rounds 3] [--variants 'default;off']

Each measurement is a fresh Python process written as a user would write it:
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
import subprocess
import sys
import textwrap

from benchmarks import common

CHILD = textwrap.dedent("""
    import json, resource, sys, time
    import jax, jax.numpy as jnp, optax
    import cnnjax
    from cnnjax import host_allocator
    name, size, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    model = cnnjax.create_model(name, num_classes=10)
    x = jnp.ones((16, size, size, 3)); y = jnp.zeros((16,), jnp.int32)
    variables = model.init(jax.random.key(0), x[:1], train=False)
    tx = optax.sgd(0.01, momentum=0.9)
    state = (variables["params"], variables["batch_stats"], tx.init(variables["params"]))

    @jax.jit
    def step(state, x, y):
      params, stats, opt = state
      def loss(p):
        logits, new = model.apply({"params": p, "batch_stats": stats}, x, train=True,
                                  mutable=["batch_stats"], rngs={"dropout": jax.random.key(1)})
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new
      (value, new), grads = jax.value_and_grad(loss, has_aux=True)(params)
      updates, opt = tx.update(grads, opt, params)
      return (optax.apply_updates(params, updates), new["batch_stats"], opt), value

    start = time.perf_counter()
    state, value = step(state, x, y); jax.block_until_ready(value)
    first = time.perf_counter() - start
    for _ in range(3):
      state, value = step(state, x, y); jax.block_until_ready(value)
    times, faults = [], []
    for _ in range(steps):
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      start = time.perf_counter()
      state, value = step(state, x, y); jax.block_until_ready(value)
      times.append(time.perf_counter() - start)
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps({"state": host_allocator.state(), "first_step_s": first,
                      "faults_per_step": sorted(faults)[len(faults) // 2],
                      "step_s": sorted(times)[len(times) // 2]}))
""")

CASES = (("faults", "mobilenet_v2", 128, 6), ("first_step", "resnet18", 64, 1),
         ("first_step", "efficientnet_b0", 64, 1))


def _variant_env(spec: str) -> tuple[str, dict]:
  base = {k: v for k, v in os.environ.items()
          if not k.startswith("MALLOC_") and k != "CNNJAX_HOST_ALLOCATOR"}
  base["JAX_ENABLE_COMPILATION_CACHE"] = "false"
  if spec == "default":
    return spec, base
  if spec == "off":
    return spec, {**base, "CNNJAX_HOST_ALLOCATOR": "0"}
  name, _, settings = spec.partition("=")
  return name, {**base, **dict(s.split("=", 1) for s in settings.split(","))}


def measure(spec: str, model: str, size: int, steps: int) -> dict:
  _, env = _variant_env(spec)
  out = subprocess.run([sys.executable, "-c", CHILD, model, str(size), str(steps)], env=env,
                       capture_output=True, text=True, timeout=900)
  if out.returncode:
    raise RuntimeError(out.stderr[-3000:])
  return json.loads(out.stdout.strip().splitlines()[-1])


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
