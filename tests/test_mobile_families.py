"""EfficientNet and MobileNet: stage data, scaling rules and the original's details."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cnnjax
from cnnjax.models import blockspec, lowering
from tests.conftest import run_compiled_quickly


def test_decode_stage_reads_the_original_block_strings():
  spec = blockspec.decode_stage("mb_r2_k5_s22_e6_i24_o40_se0.25")
  assert spec == blockspec.StageSpec(kind="mb", repeats=2, kernel=5, stride=2, expand_ratio=6.0,
                                     in_features=24, out_features=40, se_ratio=0.25)
  assert blockspec.decode_stage("ds_r1_k3_s1_o64").se_ratio == 0.0


@pytest.mark.parametrize("text,message", [
    ("xx_r1_k3_s1_o8", "block type 'xx'"),
    ("mb_r1_k3_s1", "missing field 'o'"),
    ("mb_r1_k3_s1_o8_q3", r"unknown field\(s\) \['q'\]"),
    ("mb_r1_kk_s1_o8", "cannot parse field 'kk'"),
])
def test_decode_stage_names_what_is_wrong(text, message):
  with pytest.raises(ValueError, match=message):
    blockspec.decode_stage(text)


def test_round_filters_and_repeats_follow_the_original_rules():
  # int(c * w + 4) // 8 * 8, bumped by 8 below 90% of c * w.
  assert [blockspec.round_filters(c, 1.1) for c in (32, 16, 24, 40, 80, 112, 192, 320, 1280)] == \
      [32, 16, 24, 48, 88, 120, 208, 352, 1408]
  assert blockspec.round_filters(32, 0.25) == 8
  assert blockspec.round_filters(1280, 2.0) == 2560
  assert [blockspec.round_repeats(r, 3.1) for r in (1, 2, 2, 3, 3, 4, 1)] == [4, 7, 7, 10, 10, 13, 4]
  assert blockspec.round_repeats(3, 1.0) == 3


def test_stochastic_depth_rises_linearly_with_the_block_index():
  blocks = cnnjax.create_model("efficientnet_b0").blocks
  assert len(blocks) == 16
  np.testing.assert_allclose([b.drop_path for b in blocks], [0.2 * i / 16 for i in range(16)])
  assert [b.stride for b in blocks] == [1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1, 1, 1]


def test_squeeze_excite_width_comes_from_the_block_input():
  model = cnnjax.create_model("efficientnet_b0")
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))["params"]
  # block1: input 16 channels, expanded to 96; SE squeezes to 16 * 0.25 = 4.
  assert params["block1"]["se"]["reduce"]["kernel"].shape == (1, 1, 96, 4)
  assert params["block1"]["se"]["expand"]["kernel"].shape == (1, 1, 4, 96)
  assert "bias" in params["block1"]["se"]["reduce"]
  assert "expand" not in params["block0"]  # expansion ratio 1 has no expansion conv


def _stem_padding(name, size):
  model = cnnjax.create_model(name)
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(x.shape)))
  # The padding convention is read off XLA's convolution; the fast lowering keeps it
  # (tests/test_lowering.py compares the two for SAME and explicit padding).
  with lowering.use("xla"):
    jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x))(variables, x).jaxpr
  return next(e.params["padding"] for e in jaxpr.eqns if e.primitive.name == "conv_general_dilated")


def test_padding_conventions():
  # TF 'SAME' is asymmetric for stride 2 on even sizes; torchvision pads symmetrically.
  assert tuple(map(tuple, _stem_padding("efficientnet_b0", 224))) == ((0, 1), (0, 1))
  assert tuple(map(tuple, _stem_padding("mobilenet_v2", 224))) == ((1, 1), (1, 1))


def test_batchnorm_uses_momentum_099_and_epsilon_1e3():
  model = cnnjax.create_model("efficientnet", width=0.25, depth=0.25, num_classes=3)
  x = np.random.default_rng(0).standard_normal((4, 16, 16, 3), np.float32) * 3 + 1
  variables = run_compiled_quickly(lambda: model.init(jax.random.key(1), x))
  _, updated = run_compiled_quickly(
      lambda v: model.apply(v, x, train=True, mutable=["batch_stats"],
                            rngs={"dropout": jax.random.key(2)}), variables)
  stem = jax.lax.conv_general_dilated(x, variables["params"]["stem"]["kernel"], (2, 2), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  batch_mean = stem.mean(axis=(0, 1, 2))
  np.testing.assert_allclose(updated["batch_stats"]["bn_stem"]["mean"], 0.01 * batch_mean,
                             rtol=1e-4, atol=1e-6)
  assert model.norm.keywords == {"momentum": 0.99, "epsilon": 1e-3}


def test_any_coefficients_and_their_default_resolution():
  model = cnnjax.create_model("efficientnet", width=1.1, depth=1.2, dropout=0.3)
  assert model.blocks[-1].out_features == 352 and len(model.blocks) == 23
  assert cnnjax.create_model("efficientnet").input_size == 224
  # Least-squares phi reproduces the official resolutions within 5% up to B3.
  for variant, official in (("b1", 240), ("b2", 260), ("b3", 300)):
    m = cnnjax.create_model(f"efficientnet_{variant}")
    assert abs(blockspec.default_resolution(m.width, m.depth) - official) <= 0.05 * official
    assert m.input_size == official
  width, depth, resolution = blockspec.compound_scale(1.0)
  assert (width, depth, resolution) == (1.1, 1.2, 258)
  with pytest.raises(ValueError, match="needs gamma >= 1"):
    blockspec.compound_scale(1.0, gamma=0.9)


def test_mobilenet_v1_separable_saves_what_theory_says():
  separable = cnnjax.create_model("mobilenet_v1")
  standard = cnnjax.create_model("mobilenet_v1", separable=False)
  rows_sep = {r.name: r for r in cnnjax.summary(separable, 224).rows}
  rows_std = {r.name: r for r in cnnjax.summary(standard, 224).rows}
  # block6: 512 -> 512 channels, 3x3, on 14x14: cost ratio 1/N + 1/k^2.
  sep = rows_sep["block6/depthwise"].macs + rows_sep["block6/pointwise"].macs
  assert sep / rows_std["block6/conv"].macs == pytest.approx(1 / 512 + 1 / 9)


@pytest.mark.parametrize("name,width,first,last", [
    ("mobilenet_v1_025", 0.25, 8, 256), ("mobilenet_v1_050", 0.5, 16, 512),
    ("mobilenet_v2_050", 0.5, 16, 1280),
])
def test_width_multiplier_scales_channels(name, width, first, last):
  model = cnnjax.create_model(name)
  assert model.width == width
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))["params"]
  assert params["stem"]["kernel"].shape[-1] == first
  assert params["classifier"]["kernel"].shape[0] == last


def test_compute_dtype_is_separate_from_parameter_dtype():
  model = cnnjax.create_model("resnet20", dtype=jnp.bfloat16)
  x = jnp.ones((2, 32, 32, 3))
  variables = run_compiled_quickly(lambda: model.init(jax.random.key(0), x))
  assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype("float32")}
  logits = run_compiled_quickly(model.apply, variables, x)
  assert logits.dtype == jnp.bfloat16
  reference = run_compiled_quickly(cnnjax.create_model("resnet20").apply, variables, x)
  np.testing.assert_allclose(np.asarray(logits, np.float32), reference, atol=0.1, rtol=0.1)


def test_channel_divisor_rounds_every_width_to_its_grid():
  coarse = cnnjax.create_model("efficientnet", width=0.3, depth=0.25)
  fine = cnnjax.create_model("efficientnet", width=0.3, depth=0.25, channel_divisor=1)
  assert {b.out_features % 8 for b in coarse.blocks} == {0}
  # Nearest whole channel (never below 90%): 16 * 0.3 = 4.8 -> 5, 320 * 0.3 = 96.
  assert [b.out_features for b in fine.blocks][0] == 5 and fine.blocks[-1].out_features == 96
  with pytest.raises(ValueError, match="channel_divisor must be a positive integer"):
    cnnjax.create_model("efficientnet", channel_divisor=0)
