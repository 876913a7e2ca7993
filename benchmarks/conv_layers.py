"""Every convolution of a model, one at a time: cnnjax's CPU lowering against PyTorch's.

    python -m benchmarks.conv_layers [--model resnet18] [--size 128] [--batch 16] [--rounds 15]

Where `benchmarks.train_step` puts a whole step over PyTorch's, this says which layers
make the difference. Each distinct convolution of the model (traced with plain XLA
convolutions, as `cnnjax.analysis` does) is timed alone, at the shapes the model gives
it:
- forward: `lowering.conv_general_dilated` as the model runs it (the lowering this
  machine's tuning table chose, compiled with `lowering.compiler_options("cpu")`),
  against `torch.nn.functional.conv2d` under `inference_mode`;
- training: the forward pass and the gradients a training step takes of it (the filter's,
  and the input's except for the first layer, whose input is the image), against
  PyTorch's forward and `backward()` of the same.

Timings alternate in blocks: each round runs every candidate `BLOCK` times in a row and
keeps the calls after the first. A single millisecond-scale call timed right after the
other framework's measured up to 2.5x slower (PyTorch's 7x7 stem: 19 against 7.4 ms), each
library's idle threads still holding the cores; a whole step (`benchmarks.train_step`) is
long enough for that not to matter. A layer's achieved GFLOP/s counts 2 FLOPs
per multiply-add of the forward pass (3x that for training), beside the float32 matmul
peak of both frameworks measured in the same run. Totals weight each layer by how often
the model uses it. Writes benchmarks/results/conv_layers_<model>_<size>.json.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import time

import numpy as np

from benchmarks import common


@dataclasses.dataclass(frozen=True)
class ConvLayer:
  """One convolution's static arguments: NHWC input, HWIO kernel."""
  lhs_shape: tuple[int, ...]
  rhs_shape: tuple[int, ...]
  strides: tuple[int, int]
  padding: tuple[tuple[int, int], tuple[int, int]]
  groups: int
  first: bool  # its input is the image: a training step takes no gradient of it

  @property
  def out_spatial(self) -> tuple[int, int]:
    return tuple((self.lhs_shape[1 + a] + sum(self.padding[a]) - self.rhs_shape[a])
                 // self.strides[a] + 1 for a in range(2))

  @property
  def forward_flop(self) -> int:
    kh, kw, in_per_group, out = self.rhs_shape
    return 2 * self.lhs_shape[0] * int(np.prod(self.out_spatial)) * kh * kw * in_per_group * out

  def describe(self) -> str:
    kind = "depthwise " if self.groups > 1 else ""
    return (f"{'x'.join(map(str, self.lhs_shape[1:]))} {kind}"
            f"{self.rhs_shape[0]}x{self.rhs_shape[1]}/{self.strides[0]} -> {self.rhs_shape[3]}")


def layers(name: str, size: int, batch: int) -> collections.Counter:
  """The model's convolutions at `batch` images of `size` px, with how often each occurs."""
  import cnnjax  # noqa: PLC0415
  from cnnjax import analysis  # noqa: PLC0415

  # Traced as `cnnjax.analysis` traces: plain XLA convolutions, one primitive per layer.
  _, _, closed = analysis._trace(cnnjax.create_model(name, num_classes=10),
                                 (batch, size, size, 3), 3)
  found = collections.Counter()

  def walk(jaxpr, image_var):
    for eqn in jaxpr.eqns:
      for sub in analysis._sub_jaxprs(eqn):
        inner = {s for s, o in zip(sub.invars, eqn.invars) if o is image_var}
        walk(sub, next(iter(inner), None))
      if eqn.primitive.name != "conv_general_dilated":
        continue
      lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
      found[ConvLayer(tuple(lhs), tuple(rhs), tuple(eqn.params["window_strides"]),
                      tuple(map(tuple, eqn.params["padding"])),
                      eqn.params["feature_group_count"], eqn.invars[0] is image_var)] += 1

  walk(closed.jaxpr, closed.jaxpr.invars[-1])
  return found


def _jax_runs(layer: ConvLayer):
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from cnnjax.models import lowering  # noqa: PLC0415

  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(layer.lhs_shape), jnp.float32)
  w = jnp.asarray(rng.standard_normal(layer.rhs_shape) / np.sqrt(np.prod(layer.rhs_shape[:3])),
                  jnp.float32)
  conv = functools.partial(lowering.conv_general_dilated, window_strides=layer.strides,
                           padding=layer.padding, feature_group_count=layer.groups,
                           dimension_numbers=("NHWC", "HWIO", "NHWC"))
  options = lowering.compiler_options("cpu")
  forward = jax.jit(conv).lower(x, w).compile(compiler_options=options)
  cotangent = jnp.asarray(rng.standard_normal(jax.eval_shape(conv, x, w).shape), jnp.float32)
  loss = lambda x, w: jnp.vdot(conv(x, w), cotangent)  # noqa: E731
  argnums = (1,) if layer.first else (0, 1)
  train = jax.jit(jax.value_and_grad(loss, argnums)).lower(x, w).compile(compiler_options=options)
  method = lowering.choose(layer.lhs_shape, layer.rhs_shape, layer.strides, layer.padding, None,
                           None, ("NHWC", "HWIO", "NHWC"), layer.groups, 1)
  return (method, lambda: jax.block_until_ready(forward(x, w)),
          lambda: jax.block_until_ready(train(x, w)))


def _torch_runs(layer: ConvLayer):
  import torch  # noqa: PLC0415

  n, h, w, c = layer.lhs_shape
  kh, kw, in_per_group, out = layer.rhs_shape
  (top, bottom), (left, right) = layer.padding
  x = torch.randn(n, c, h, w)
  weight = torch.randn(out, in_per_group, kh, kw) / np.sqrt(kh * kw * in_per_group)

  def conv(x, weight):
    padded = x if top == bottom and left == right else torch.nn.functional.pad(
        x, (left, right, top, bottom))
    padding = (top, left) if top == bottom and left == right else 0
    return torch.nn.functional.conv2d(padded, weight, stride=layer.strides, padding=padding,
                                      groups=layer.groups)

  def forward():
    with torch.inference_mode():
      conv(x, weight)

  x_train = x.clone().requires_grad_(not layer.first)
  weight_train = weight.clone().requires_grad_(True)
  cotangent = torch.randn(n, out, *layer.out_spatial)

  def train():
    conv(x_train, weight_train).backward(cotangent)
    weight_train.grad = x_train.grad = None

  return forward, train


BLOCK = 4


def in_blocks(callables: dict, rounds: int) -> dict[str, float]:
  """Median seconds per call of each callable, timed in blocks of `BLOCK` consecutive calls
  (the first of each block untimed), the blocks of all callables alternating."""
  def block(fn):
    def run():
      fn()
      start = time.perf_counter()
      for _ in range(BLOCK - 1):
        fn()
      return (time.perf_counter() - start) / (BLOCK - 1)
    return run

  runs = {key: block(fn) for key, fn in callables.items()}
  times = {key: [] for key in runs}
  for _ in range(rounds):
    for key, run in runs.items():
      times[key].append(run())
  return common.medians(times)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="resnet18")
  parser.add_argument("--size", type=int, default=128)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--rounds", type=int, default=15)
  args = parser.parse_args(argv)

  import torch  # noqa: PLC0415

  from benchmarks.train_step import matmul_peak  # noqa: PLC0415

  peak = matmul_peak()
  rows = []
  for layer, count in layers(args.model, args.size, args.batch).items():
    method, jax_forward, jax_train = _jax_runs(layer)
    torch_forward, torch_train = _torch_runs(layer)
    seconds = in_blocks({"jax_forward": jax_forward, "torch_forward": torch_forward,
                         "jax_train": jax_train, "torch_train": torch_train}, args.rounds)
    row = {"layer": layer.describe(), "count": count, "method": method,
           "first": layer.first, "forward_gflop": layer.forward_flop / 1e9,
           **{f"{k}_ms": 1e3 * v for k, v in seconds.items()},
           "forward_ratio": seconds["jax_forward"] / seconds["torch_forward"],
           "train_ratio": seconds["jax_train"] / seconds["torch_train"]}
    rows.append(row)
    print(" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                   for k, v in row.items()), flush=True)
  totals = {key: sum(r[f"{key}_ms"] * r["count"] for r in rows)
            for key in ("jax_forward", "torch_forward", "jax_train", "torch_train")}
  summary = {"forward_ratio": totals["jax_forward"] / totals["torch_forward"],
             "train_ratio": totals["jax_train"] / totals["torch_train"],
             **{f"{k}_ms": v for k, v in totals.items()}}
  print("all convolutions, weighted by use:", {k: round(v, 3) for k, v in summary.items()})
  print("matmul peak GFLOP/s:", {k: round(v) for k, v in peak.items()})
  common.write(f"conv_layers_{args.model}_{args.size}", {
      "command": f"python -m benchmarks.conv_layers --model {args.model} --size {args.size} "
                 f"--batch {args.batch} --rounds {args.rounds}",
      "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
      "matmul_peak": peak, "rows": rows, "totals": summary})


if __name__ == "__main__":
  main()
