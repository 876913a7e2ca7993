"""The registry's public contract: names, info, construction, errors."""

import dataclasses

import pytest

import cnnjax

REQUIRED = (
    ["alexnet", "alexnet_paper", "googlenet", "mobilenet_v1", "mobilenet_v2", "efficientnet"]
    + [f"vgg{d}{bn}" for d in (11, 13, 16, 19) for bn in ("", "_bn")]
    + [f"resnet{d}" for d in (18, 34, 50, 101, 152)]
    + [f"{p}{d}" for p in ("resnet", "plain") for d in (20, 32, 44, 56, 110)]
    + [f"densenet{d}" for d in (121, 161, 169, 201)]
    + [f"efficientnet_b{i}" for i in range(8)]
    + [f"mobilenet_v{v}_{w}" for v in (1, 2) for w in ("025", "050", "075")]
)


def test_every_mission_model_is_registered():
  names = cnnjax.list_models()
  assert names == sorted(names)
  assert sorted(set(REQUIRED) - set(names)) == []


def test_list_models_filters_by_pattern():
  assert cnnjax.list_models("vgg1[69]*") == ["vgg16", "vgg16_bn", "vgg19", "vgg19_bn"]
  assert cnnjax.list_models("nothing*") == []


def test_unknown_model_lists_the_closest_names():
  with pytest.raises(ValueError, match=r"Unknown model 'resnet19'.*resnet18"):
    cnnjax.create_model("resnet19")
  with pytest.raises(ValueError, match="Unknown model"):
    cnnjax.model_info("efficientnet_b9")


def test_overrides_are_validated_and_applied():
  model = cnnjax.create_model("resnet18", num_classes=7, zero_init_residual=True)
  assert model.num_classes == 7 and model.zero_init_residual
  with pytest.raises(ValueError, match=r"'zero_init_resid' \(did you mean 'zero_init_residual'\?\)"):
    cnnjax.create_model("resnet18", zero_init_resid=True)
  with pytest.raises(ValueError, match="num_classes must be a positive integer"):
    cnnjax.create_model("resnet18", num_classes=0)


def test_default_classes_follow_the_variant():
  assert cnnjax.create_model("resnet18").num_classes == 1000
  assert cnnjax.create_model("resnet20").num_classes == 10


def test_model_info_is_frozen_and_complete():
  info = cnnjax.model_info("efficientnet_b3")
  assert (info.input_size, info.crop_fraction, info.interpolation) == (300, 0.904, "bicubic")
  assert info.mean == (0.485, 0.456, 0.406) and "Tan" in info.paper
  with pytest.raises(dataclasses.FrozenInstanceError):
    info.input_size = 1
  cifar = cnnjax.model_info("plain56")
  assert (cifar.input_size, cifar.num_classes, cifar.family) == (32, 10, "cifar_plain")


def test_every_model_names_its_paper():
  for name in cnnjax.list_models():
    info = cnnjax.model_info(name)
    assert info.paper and info.family and info.input_size >= info.min_input_size, name


def test_impossible_coefficients_are_rejected():
  with pytest.raises(ValueError, match="width multiplier must be positive"):
    cnnjax.create_model("efficientnet", width=0.0)
  with pytest.raises(ValueError, match="drop_path must be in"):
    cnnjax.create_model("efficientnet", drop_path=1.5)
