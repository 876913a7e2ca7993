"""Writes the committed weight-parity references: reduced-width PyTorch models and their logits.

Run:  .venv/bin/python tests/reference/weights/make_weights.py   (needs `make test-torch`'s
      torch, torchvision and timm)

For each entry of `tests/torch_models.NARROW`: the torchvision/timm model
with every BatchNorm statistic and affine parameter randomised, its state
dict as `<key>.safetensors` (written by the safetensors package, not by
cnnjax), two random images and the model's eval-mode logits as
`<key>.logits.npz`, and `index.json` saying which cnnjax model and overrides
are the same network. `tests/test_weights.py` loads them without PyTorch.
"""

import json
import pathlib
import sys

import numpy as np
import safetensors.torch
import timm
import torch
import torchvision

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

import torch_models  # noqa: E402  (tests/torch_models.py)


def main() -> None:
  torch.manual_seed(0)
  index = {"_about": {"torch": torch.__version__, "torchvision": torchvision.__version__,
                      "timm": timm.__version__, "script": "tests/reference/weights/make_weights.py"}}
  for seed, (key, (name, overrides, build, size)) in enumerate(torch_models.NARROW.items()):
    model = torch_models.randomise_batch_norm(build(), size, seed)
    images = torch_models.images(2, size, seed)
    logits = torch_models.logits(model, images)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    safetensors.torch.save_file(state, HERE / f"{key}.safetensors")
    np.savez(HERE / f"{key}.logits.npz", images=images, logits=logits)
    index[key] = {"model": name, "overrides": overrides, "num_classes": torch_models.NUM_CLASSES,
                  "image_size": size, "builder": getattr(build, "__name__", None) or repr(build.func)}
    print(f"{key}: {sum(v.numel() for v in state.values()):,} values, max |logit| "
          f"{np.abs(logits).max():.3g}")
  (HERE / "index.json").write_text(json.dumps(index, indent=1) + "\n")


if __name__ == "__main__":
  main()
