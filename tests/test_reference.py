"""Every model against the reference facts: parameters, BatchNorm state, FLOPs."""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cnnjax
from cnnjax.models import blockspec

REFERENCED = [n for n in cnnjax.list_models() if cnnjax.model_info(n).reference]


def _abstract_variables(model, size, channels=3):
  x = jnp.zeros((1, size, size, channels))
  rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
  return jax.eval_shape(lambda: model.init(rngs, x, train=False))


def _count(tree):
  return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(tree)))


def test_the_copied_reference_facts_equal_the_shared_originals():
  tests = pathlib.Path(__file__).resolve().parent
  shared = tests.parents[1] / "shared" / "reference"
  if not shared.is_dir():
    pytest.skip(f"no shared reference facts beside this clone ({shared})")
  for name in ("models.json", "efficientnet.md"):
    assert (tests / "reference" / name).read_bytes() == (shared / name).read_bytes(), (
        f"tests/reference/{name} differs from {shared / name}: copy the shared file again")


def test_every_named_reference_exists(reference_models):
  missing = [(n, cnnjax.model_info(n).reference) for n in REFERENCED
             if cnnjax.model_info(n).reference not in reference_models]
  assert missing == []
  # The references this zoo can be held to are all used.
  assert len(REFERENCED) >= 37


@pytest.mark.parametrize("name", REFERENCED)
def test_params_bn_state_and_flops_equal_the_reference(name, reference_models):
  ref = reference_models[cnnjax.model_info(name).reference]
  model = cnnjax.create_model(name)
  variables = _abstract_variables(model, ref["resolution"])
  assert cnnjax.count_params(variables) == ref["params"]
  assert _count(variables.get("batch_stats", {})) == ref["bn_buffers"]
  measured = cnnjax.flops(model, (ref["resolution"], ref["resolution"], 3))
  assert measured == pytest.approx(ref["flops"], rel=0.02)


def test_googlenet_aux_heads_match_torchvision(reference_models):
  ref = reference_models["torchvision/googlenet_auxTrue"]
  model = cnnjax.create_model("googlenet", aux_logits=True)
  variables = _abstract_variables(model, 224)
  assert cnnjax.count_params(variables) == ref["params"]
  assert _count(variables["batch_stats"]) == ref["bn_buffers"]
  # The heads run in training only: inference FLOPs are those of the plain network.
  assert cnnjax.flops(model, 224) == ref["flops"]
  x = jnp.zeros((2, 224, 224, 3))
  train_out = jax.eval_shape(lambda v: model.apply(v, x, train=True, mutable=["batch_stats"],
                                                   rngs={"dropout": jax.random.key(0)})[0], variables)
  assert [o.shape for o in train_out] == [(2, 1000)] * 3
  eval_out = jax.eval_shape(lambda v: model.apply(v, x, train=False), variables)
  assert eval_out.shape == (2, 1000)


def test_plain_twins_have_exactly_the_residual_parameters(reference_models):
  for depth in (20, 32, 44, 56, 110):
    plain = _abstract_variables(cnnjax.create_model(f"plain{depth}"), 32)
    residual = _abstract_variables(cnnjax.create_model(f"resnet{depth}"), 32)
    assert jax.tree.map(lambda a: a.shape, plain) == jax.tree.map(lambda a: a.shape, residual)
    assert cnnjax.count_params(plain) == reference_models[f"cifar/resnet{depth}"]["params"]


def test_alexnet_paper_counts_follow_from_its_layer_table():
  # Krizhevsky et al. 2012, figure 2, with the two-GPU split: conv2, conv4 and
  # conv5 see only the 48/192/192 input maps of their own GPU.
  conv = [(11, 3, 96), (5, 48, 256), (3, 256, 384), (3, 192, 384), (3, 192, 256)]
  dense = [(6 * 6 * 256, 4096), (4096, 4096), (4096, 1000)]
  expected = sum(k * k * cin * cout + cout for k, cin, cout in conv)
  expected += sum(i * o + o for i, o in dense)
  model = cnnjax.create_model("alexnet_paper")
  assert cnnjax.count_params(_abstract_variables(model, 227)) == expected
  table = cnnjax.summary(model, 227)
  shapes = {row.name: row.output_shape[1:] for row in table.rows}
  assert shapes["conv1"] == (55, 55, 96) and shapes["conv5"] == (13, 13, 256)
  assert [r.kind for r in table.rows if r.kind == "maxpool"] == ["maxpool"] * 3


def test_vgg16_summary_receptive_fields_and_parameter_sum():
  table = cnnjax.summary(cnnjax.create_model("vgg16"), 224)
  fields = [row.receptive_field for row in table.rows[:6]]
  assert fields == [3, 5, 6, 10, 14, 16]
  assert [row.stride for row in table.rows[:6]] == [1, 1, 2, 2, 2, 4]
  assert sum(row.params for row in table.rows) == table.total_params == 138_357_544
  assert sum(row.macs for row in table.rows) * 2 == table.flops
  text = str(table)
  assert "conv1" in text and "138,357,544 parameters" in text


def test_summary_of_1x1_reductions_shows_the_savings():
  # GoogLeNet inception3a: the 3x3 branch after a 96-channel 1x1 reduction
  # costs 192*96 + 9*96*128 weights instead of 9*192*128 without it.
  rows = {r.name: r for r in cnnjax.summary(cnnjax.create_model("googlenet"), 224).rows}
  reduced = rows["inception3a/branch2_reduce/conv"].params + rows["inception3a/branch2/conv"].params
  assert reduced == 192 * 96 + 9 * 96 * 128
  assert reduced < 9 * 192 * 128


def _reference_table(text):
  rows = {}
  for line in text.splitlines():
    match = re.match(r"\|\s*(B[0-7])\s*\|\s*(\d+)\s*\|\s*([\d,]+)\s*\|\s*([\d,]+)\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|", line)
    if match:
      name, stem, channels, repeats, blocks, head = match.groups()
      rows[name.lower()] = (int(stem), tuple(map(int, channels.split(","))),
                            tuple(map(int, repeats.split(","))), int(blocks), int(head))
  return rows


def test_efficientnet_derived_table_equals_the_reference(efficientnet_reference):
  table = _reference_table(efficientnet_reference)
  assert sorted(table) == [f"b{i}" for i in range(8)]
  for variant, (stem, channels, repeats, blocks, head) in table.items():
    model = cnnjax.create_model(f"efficientnet_{variant}")
    specs = model.blocks
    stage_channels = tuple(max(s.out_features for s in specs if s.stage == i) for i in range(7))
    stage_repeats = tuple(sum(1 for s in specs if s.stage == i) for i in range(7))
    assert blockspec.round_filters(model.stem_features, model.width) == stem, variant
    assert (stage_channels, stage_repeats, len(specs)) == (channels, repeats, blocks), variant
    assert blockspec.round_filters(model.head_features, model.width) == head, variant
    # ...and the built network really has those widths.
    variables = _abstract_variables(model, 64)
    assert variables["params"]["stem"]["kernel"].shape[-1] == stem
    assert variables["params"]["head"]["kernel"].shape[-1] == head
    assert variables["params"][f"block{blocks - 1}"]["project"]["kernel"].shape[-1] == channels[-1]
