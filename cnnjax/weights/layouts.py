"""Where each cnnjax variable lives in a torchvision or timm state dict.

A `Layout` is one library's naming of one family: a pure function from a
flax module path (`("layer1_0", "downsample_conv")`) to the PyTorch module
path (`"layer1.0.downsample.0"`), given the built module for the facts the
names depend on (VGG's layer list, the blocks of a mobile network). Leaf
names and tensor layouts are common to every family (`LEAVES`, `to_torch`,
`from_torch`). The first layout of a family is the reference's own, the one
`save_weights` writes.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence

import numpy as np
from flax import linen as nn

# (collection, flax leaf) -> the PyTorch parameter or buffer name.
LEAVES = {
    ("params", "kernel"): "weight",
    ("params", "bias"): "bias",
    ("params", "scale"): "weight",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}
# A BatchNorm's step counter: PyTorch saves it, nothing computes with it in eval mode.
BATCHES_TRACKED = "num_batches_tracked"


def to_torch(array: np.ndarray) -> np.ndarray:
  """Flax layout -> PyTorch: HWIO convolution kernels to OIHW, (in, out) dense kernels to (out, in)."""
  if array.ndim == 4:
    return np.ascontiguousarray(np.transpose(array, (3, 2, 0, 1)))
  if array.ndim == 2:
    return np.ascontiguousarray(array.T)
  return array


def from_torch(array: np.ndarray) -> np.ndarray:
  if array.ndim == 4:
    return np.ascontiguousarray(np.transpose(array, (2, 3, 1, 0)))
  if array.ndim == 2:
    return np.ascontiguousarray(array.T)
  return array


def torch_shape(shape: Sequence[int]) -> tuple[int, ...]:
  shape = tuple(shape)
  if len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  if len(shape) == 2:
    return (shape[1], shape[0])
  return shape


@dataclasses.dataclass(frozen=True)
class Layout:
  """One library's state-dict names for one family."""
  library: str
  # (model, flax module path) -> PyTorch module path; KeyError for a module it lacks.
  module_name: Callable[[nn.Module, tuple[str, ...]], str]
  # Checkpoint keys the model may go without (GoogLeNet's auxiliary heads).
  optional: Callable[[nn.Module, str], bool] = lambda model, key: False
  # Older spellings of the same keys, renamed on reading (DenseNet's "norm.1").
  legacy: Callable[[str], str] = lambda key: key


def _alexnet(model: nn.Module, path: tuple[str, ...]) -> str:
  (name,) = path
  if name.startswith("fc"):
    return {"fc1": "classifier.1", "fc2": "classifier.4", "fc3": "classifier.6"}[name]
  # torchvision's `features`: conv, ReLU, [LRN], [max-pool] per layer.
  positions, at = [], 0
  for *_, lrn, pool in model.layers:
    positions.append(at)
    at += 2 + int(lrn) + int(pool)
  return f"features.{positions[int(name[len('conv'):]) - 1]}"


def _vgg(model: nn.Module, path: tuple[str, ...]) -> str:
  (name,) = path
  if name.startswith("fc"):
    return {"fc1": "classifier.0", "fc2": "classifier.3", "fc3": "classifier.6"}[name]
  # torchvision's `features`: conv, [BN], ReLU per layer, one module per max-pool.
  convs, at = [], 0
  for layer in model.layers:
    if layer == "M":
      at += 1
      continue
    convs.append(at)
    at += 3 if model.batch_norm else 2
  kind, number = re.fullmatch(r"(conv|bn)(\d+)", name).groups()
  return f"features.{convs[int(number) - 1] + (kind == 'bn')}"


def _resnet(model: nn.Module, path: tuple[str, ...]) -> str:
  head, *rest = path
  block = re.fullmatch(r"layer(\d+)_(\d+)", head)
  if block:
    head = f"layer{block[1]}.{block[2]}"
  shortcut = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}
  return ".".join([head, *(shortcut.get(p, p) for p in rest)])


_GOOGLENET_BRANCHES = {"branch2_reduce": "branch2.0", "branch2": "branch2.1",
                       "branch3_reduce": "branch3.0", "branch3": "branch3.1",
                       "branch4": "branch4.1"}


def _googlenet(model: nn.Module, path: tuple[str, ...]) -> str:
  return ".".join(_GOOGLENET_BRANCHES.get(p, p) for p in path)


def _googlenet_optional(model: nn.Module, key: str) -> bool:
  # torchvision's checkpoints carry the auxiliary heads, used in training only.
  return not model.aux_logits and key.startswith(("aux1.", "aux2."))


def _densenet(model: nn.Module, path: tuple[str, ...]) -> str:
  head, *rest = path
  if head == "classifier":
    return "classifier"
  layer = re.fullmatch(r"block(\d+)_layer(\d+)", head)
  if layer:
    head = f"denseblock{layer[1]}.denselayer{layer[2]}"
  else:
    head = {"conv0": "conv0", "bn0": "norm0",
            "bn_final": f"norm{len(model.block_sizes) + 1}"}.get(head, head)
  rest = [{"bn1": "norm1", "bn2": "norm2", "bn": "norm"}.get(p, p) for p in rest]
  return ".".join(["features", head, *rest])


_DENSENET_LEGACY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")


def _densenet_legacy(key: str) -> str:
  # torchvision's published DenseNet files still say "norm.1"; its loader renames them too.
  match = _DENSENET_LEGACY.match(key)
  return match[1] + match[2] if match else key


def _block_index(name: str) -> int:
  match = re.fullmatch(r"block(\d+)", name)
  if not match:
    raise KeyError(name)
  return int(match[1])


def _mobilenet_v2_torchvision(model: nn.Module, path: tuple[str, ...]) -> str:
  head, *rest = path
  blocks = model.blocks
  top = {"stem": "features.0.0", "bn_stem": "features.0.1",
         "head": f"features.{len(blocks) + 1}.0", "bn_head": f"features.{len(blocks) + 1}.1",
         "classifier": "classifier.1"}
  if head in top:
    return top[head]
  index = _block_index(head)
  # InvertedResidual.conv: [Conv-BN-ReLU6 expand], Conv-BN-ReLU6 depthwise, project conv, BN.
  pairs = ([("expand", "bn_expand")] if blocks[index].expand_ratio != 1 else [])
  pairs.append(("depthwise", "bn_dw"))
  names = {}
  for position, (conv, norm) in enumerate(pairs):
    names[conv], names[norm] = f"conv.{position}.0", f"conv.{position}.1"
  names["project"], names["bn_project"] = f"conv.{len(pairs)}", f"conv.{len(pairs) + 1}"
  return f"features.{index + 1}.{names[rest[0]]}"


def _stages_as_built(blocks) -> list[int]:
  return [spec.stage for spec in blocks]


def _stages_by_stride(blocks) -> list[int]:
  """timm's MobileNet v1 groups blocks into stages that each begin with a stride-2 block."""
  stages, stage = [], 0
  for index, spec in enumerate(blocks):
    if index > 0 and spec.stride > 1:
      stage += 1
    stages.append(stage)
  return stages


def _timm_mobile(stage_of: Callable) -> Callable:
  """timm's EfficientNet/MobileNet builder names: conv_stem, blocks.<stage>.<index>, conv_head."""

  def module_name(model: nn.Module, path: tuple[str, ...]) -> str:
    head, *rest = path
    top = {"stem": "conv_stem", "bn_stem": "bn1", "head": "conv_head", "bn_head": "bn2",
           "classifier": "classifier"}
    if head in top:
      return top[head]
    blocks = model.blocks
    index = _block_index(head)
    stages = stage_of(blocks)
    stage = stages[index]
    position = index - stages.index(stage)
    spec = blocks[index]
    if rest[0] == "se":
      return f"blocks.{stage}.{position}.se.conv_{rest[1]}"
    if spec.kind == "ds" or spec.expand_ratio == 1:  # timm's DepthwiseSeparableConv
      names = {"depthwise": "conv_dw", "bn_dw": "bn1", "pointwise": "conv_pw", "bn_pw": "bn2",
               "project": "conv_pw", "bn_project": "bn2"}
    else:  # timm's InvertedResidual
      names = {"expand": "conv_pw", "bn_expand": "bn1", "depthwise": "conv_dw", "bn_dw": "bn2",
               "project": "conv_pwl", "bn_project": "bn3"}
    return f"blocks.{stage}.{position}.{names[rest[0]]}"

  return module_name


# family -> its layouts, the reference's own first.
LAYOUTS: dict[str, tuple[Layout, ...]] = {
    "alexnet": (Layout("torchvision", _alexnet),),
    "vgg": (Layout("torchvision", _vgg),),
    "resnet": (Layout("torchvision", _resnet),),
    "googlenet": (Layout("torchvision", _googlenet, optional=_googlenet_optional),),
    "densenet": (Layout("torchvision", _densenet, legacy=_densenet_legacy),),
    "mobilenet_v2": (Layout("torchvision", _mobilenet_v2_torchvision),
                     Layout("timm", _timm_mobile(_stages_as_built))),
    "mobilenet_v1": (Layout("timm", _timm_mobile(_stages_by_stride)),),
    "efficientnet": (Layout("timm", _timm_mobile(_stages_as_built)),),
}
