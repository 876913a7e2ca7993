"""Inputs too small for an architecture fail clearly, and the stated minimum is tight."""

import jax
import jax.numpy as jnp
import pytest

import cnnjax
from cnnjax.analysis import _trace
from cnnjax.models import common

GUARDED = [n for n in cnnjax.list_models() if cnnjax.model_info(n).min_input_size > 1]


def _no_empty_feature_map(jaxpr) -> bool:
  for eqn in jaxpr.eqns:
    for var in eqn.outvars:
      shape = var.aval.shape
      if len(shape) == 4 and 0 in shape[1:3]:
        return False
    for key in ("jaxpr", "call_jaxpr"):
      sub = eqn.params.get(key)
      if sub is not None and not _no_empty_feature_map(getattr(sub, "jaxpr", sub)):
        return False
  return True


def test_alexnet_at_32_pixels_names_the_smallest_size():
  model = cnnjax.create_model("alexnet")
  with pytest.raises(common.InputTooSmallError, match=r"32x32.*smallest input that works is 63x63"):
    model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def test_the_families_with_vanishing_maps_are_guarded():
  families = {cnnjax.model_info(n).family for n in GUARDED}
  assert families == {"alexnet", "vgg", "densenet", "googlenet"}


@pytest.mark.parametrize("name", ["alexnet", "alexnet_paper", "vgg11", "vgg19_bn", "densenet121",
                                  "densenet161", "googlenet"])
def test_minimum_input_size_is_exact(name, monkeypatch):
  minimum = cnnjax.model_info(name).min_input_size
  model = cnnjax.create_model(name)
  # At the minimum every feature map is non-empty...
  _, _, closed = _trace(model, (minimum, minimum, 3), 3)
  assert _no_empty_feature_map(closed.jaxpr)
  # ...one pixel less is refused with the minimum in the message...
  with pytest.raises(common.InputTooSmallError, match=f"{minimum}x{minimum}"):
    _trace(model, (minimum - 1, minimum - 1, 3), 3)
  # ...and without the guard some feature map would really be empty there.
  monkeypatch.setattr(common, "require_input_size", lambda *args: None)
  try:
    _, _, closed = _trace(model, (minimum - 1, minimum - 1, 3), 3)
  except (TypeError, ValueError):
    return  # XLA's shape rules already reject it: also proof of vanishing maps
  assert not _no_empty_feature_map(closed.jaxpr)


def test_rank_errors_are_explained():
  model = cnnjax.create_model("resnet20")
  with pytest.raises(ValueError, match="expects NHWC images of rank 4"):
    model.init(jax.random.key(0), jnp.zeros((32, 32, 3)))
