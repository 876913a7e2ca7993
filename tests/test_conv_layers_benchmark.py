"""benchmarks/conv_layers.py finds every convolution of a model (its timing needs PyTorch)."""

from __future__ import annotations

from benchmarks import conv_layers


def test_every_convolution_of_resnet18_is_found_once_per_use_with_its_shapes():
  found = conv_layers.layers("resnet18", 32, 2)
  # A stem, 16 3x3 convolutions in 8 basic blocks, 3 strided 1x1 shortcuts.
  assert sum(found.values()) == 20
  [stem] = [layer for layer in found if layer.first]
  assert stem.lhs_shape == (2, 32, 32, 3) and stem.rhs_shape == (7, 7, 3, 64)
  assert stem.strides == (2, 2) and stem.padding == ((3, 3), (3, 3))
  assert stem.out_spatial == (16, 16)
  assert stem.forward_flop == 2 * 2 * 16 * 16 * 7 * 7 * 3 * 64
  by_kernel = {}
  for layer, count in found.items():
    by_kernel[layer.rhs_shape[:2]] = by_kernel.get(layer.rhs_shape[:2], 0) + count
  assert by_kernel == {(7, 7): 1, (3, 3): 16, (1, 1): 3}
  # The last stage's 3x3 convolutions see 512 channels on a 1x1 map (32 px / 32).
  assert found[conv_layers.ConvLayer((2, 1, 1, 512), (3, 3, 512, 512), (1, 1), ((1, 1), (1, 1)),
                                     1, False)] == 3
