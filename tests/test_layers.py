"""Building blocks against independent NumPy implementations of their definitions."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax.models import common
from cnnjax.models.cifar_resnet import zero_pad_shortcut


def _numpy_lrn(a, size, alpha, beta, k):
  out = np.empty_like(a)
  channels = a.shape[-1]
  for i in range(channels):
    lo, hi = max(0, i - size // 2), min(channels - 1, i + size // 2)
    denom = (k + alpha * np.sum(a[..., lo:hi + 1] ** 2, axis=-1)) ** beta
    out[..., i] = a[..., i] / denom
  return out


def test_local_response_norm_matches_the_paper_formula():
  a = np.random.default_rng(0).normal(size=(2, 3, 3, 11)).astype(np.float32) * 10
  lrn = common.LocalResponseNorm(size=5, alpha=1e-2, beta=0.75, k=2.0)
  got = lrn.apply({}, jnp.asarray(a))
  np.testing.assert_allclose(got, _numpy_lrn(a, 5, 1e-2, 0.75, 2.0), rtol=1e-5)


def _numpy_adaptive_avg(x, out):
  n, h, w, c = x.shape
  result = np.zeros((n, out, out, c), x.dtype)
  for i in range(out):
    h0, h1 = math.floor(i * h / out), math.ceil((i + 1) * h / out)
    for j in range(out):
      w0, w1 = math.floor(j * w / out), math.ceil((j + 1) * w / out)
      result[:, i, j] = x[:, h0:h1, w0:w1].mean(axis=(1, 2))
  return result


@pytest.mark.parametrize("size,out", [(7, 3), (5, 7), (14, 4), (6, 6), (12, 6), (1, 7)])
def test_adaptive_avg_pool_matches_pytorch_bins(size, out):
  x = np.random.default_rng(size).normal(size=(2, size, size, 3)).astype(np.float32)
  got = common.adaptive_avg_pool(jnp.asarray(x), out)
  np.testing.assert_allclose(got, _numpy_adaptive_avg(x, out), rtol=1e-5, atol=1e-6)


def _numpy_max_pool(x, window, stride, pad, ceil_mode):
  n, h, w, c = x.shape

  def out_size(size):
    if ceil_mode:
      o = math.ceil((size + 2 * pad - window) / stride) + 1
      if (o - 1) * stride >= size + pad:
        o -= 1
      return o
    return (size + 2 * pad - window) // stride + 1

  padded = np.full((n, h + 2 * pad + window, w + 2 * pad + window, c), -np.inf, x.dtype)
  padded[:, pad:pad + h, pad:pad + w] = x
  oh, ow = out_size(h), out_size(w)
  result = np.empty((n, oh, ow, c), x.dtype)
  for i in range(oh):
    for j in range(ow):
      result[:, i, j] = padded[:, i * stride:i * stride + window, j * stride:j * stride + window].max(axis=(1, 2))
  return result


@pytest.mark.parametrize("size,window,stride,pad,ceil_mode", [
    (112, 3, 2, 0, True), (113, 3, 2, 0, True), (14, 2, 2, 0, True), (7, 3, 1, 1, True),
    (56, 3, 2, 1, False), (27, 3, 2, 0, False), (3, 3, 2, 0, True),
])
def test_max_pool_matches_pytorch_semantics(size, window, stride, pad, ceil_mode):
  x = np.random.default_rng(size).normal(size=(1, size, size, 2)).astype(np.float32)
  got = common.max_pool(jnp.asarray(x), window, stride, pad, ceil_mode)
  np.testing.assert_array_equal(got, _numpy_max_pool(x, window, stride, pad, ceil_mode))


def test_stochastic_depth_drops_whole_samples_and_keeps_the_mean():
  layer = common.StochasticDepth(rate=0.25)
  x = jnp.ones((20000, 2, 2, 3))
  assert layer.apply({}, x, train=False) is x
  y = np.asarray(layer.apply({}, x, train=True, rngs={"dropout": jax.random.key(0)}))
  per_sample = y.reshape(len(y), -1)
  # Every sample is either dropped whole or kept whole and rescaled by 1/keep.
  assert set(np.unique(per_sample)) <= {0.0, np.float32(1 / 0.75)}
  assert np.all(per_sample.min(axis=1) == per_sample.max(axis=1))
  kept = (per_sample[:, 0] > 0).mean()
  assert abs(kept - 0.75) < 0.015
  assert abs(y.mean() - 1.0) < 0.02


def test_option_a_shortcut_subsamples_and_zero_pads():
  x = jnp.arange(1 * 4 * 4 * 2, dtype=jnp.float32).reshape(1, 4, 4, 2)
  y = zero_pad_shortcut(x, features=6, strides=2)
  assert y.shape == (1, 2, 2, 6)
  np.testing.assert_array_equal(y[..., 2:4], x[:, ::2, ::2, :])
  assert float(jnp.abs(y[..., :2]).sum() + jnp.abs(y[..., 4:]).sum()) == 0.0


def test_make_divisible_rounds_to_multiples_without_losing_ten_percent():
  for value in np.linspace(1, 700, 500):
    rounded = common.make_divisible(value, 8)
    assert rounded % 8 == 0 and rounded >= 8
    assert rounded >= 0.9 * value and abs(rounded - value) <= 8


def test_tf_initialisers_have_the_original_scales():
  key = jax.random.key(0)
  kernel = common.tf_efficientnet_conv_init(key, (3, 3, 64, 128))
  assert abs(float(kernel.std()) - math.sqrt(2 / (9 * 128))) < 0.01 * math.sqrt(2 / (9 * 128)) * 5
  # Depthwise: Flax (k, k, 1, C); TF's fan_out for depthwise is k*k*1.
  depthwise = common.tf_efficientnet_conv_init(key, (5, 5, 1, 4096))
  assert abs(float(depthwise.std()) - math.sqrt(2 / 25)) < 0.02
  dense = common.tf_efficientnet_dense_init(key, (1280, 1000))
  assert float(jnp.abs(dense).max()) <= 1 / math.sqrt(1000)
  assert float(jnp.abs(dense).max()) > 0.99 / math.sqrt(1000)
