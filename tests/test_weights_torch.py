"""Every model with a reference, at full size, against PyTorch: `make test-torch`.

For each model: the torchvision/timm network with every BatchNorm statistic and
affine parameter randomised, saved as `.pth` and `.safetensors`. cnnjax loads
each, and on random 128 px images in eval mode:

- in float64 (both libraries) its logits equal PyTorch's to 1e-8 of the
  largest logit: the same computation, to rounding;
- in float32 they equal PyTorch's to 1e-4 of the largest logit, or, where the
  random network amplifies rounding so much that PyTorch's own float32 logits
  are further than that from its float64 ones, cnnjax's float32 logits are no
  further from the float64 ones than PyTorch's (within 4x: two float32
  implementations that sum in different orders).

Then `save_weights` writes cnnjax's variables back and PyTorch, loading them
strictly, gives the same logits again.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")
pytest.importorskip("timm")
safetensors_torch = pytest.importorskip("safetensors.torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import cnnjax  # noqa: E402
from cnnjax import weights  # noqa: E402
from cnnjax.weights import WeightsError  # noqa: E402

import torch_models  # noqa: E402  (tests/ is on sys.path under pytest)

pytestmark = pytest.mark.torch

SIZE = 128
TOLERANCE = 1e-4
EXACT = 1e-8


def _relative_error(got, want):
  return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("name", sorted(torch_models.FULL))
def test_full_size_logits_equal_pytorch(name, tmp_path):
  torch.manual_seed(0)
  reference = torch_models.randomise_batch_norm(torch_models.FULL[name](), SIZE, seed=1)
  images = torch_models.images(2, SIZE, seed=2)
  want = torch_models.logits(reference, images)
  state = {k: v.contiguous() for k, v in reference.state_dict().items()}
  torch.save(state, tmp_path / "weights.pth")
  safetensors_torch.save_file(state, tmp_path / "weights.safetensors")
  del state

  with torch.no_grad():
    exact = reference.double()(torch.from_numpy(
        images.transpose(0, 3, 1, 2).astype(np.float64))).numpy()
  reference.float()
  torch_rounding = _relative_error(want, exact)

  apply = jax.jit(cnnjax.create_model(name).apply)
  for source in ("weights.pth", "weights.safetensors"):
    variables = weights.load_weights(name, tmp_path / source)
    got = np.asarray(apply(variables, images))
    error, rounding = _relative_error(got, want), _relative_error(got, exact)
    assert error < TOLERANCE or rounding <= 4 * torch_rounding, (
        f"{name} from {source}: {error:.2e} of the largest logit from PyTorch's; from the float64 "
        f"logits cnnjax {rounding:.2e}, PyTorch {torch_rounding:.2e}")
  with jax.enable_x64(True):
    f64 = {"dtype": jnp.float64, "param_dtype": jnp.float64}
    variables64 = weights.load_weights(name, tmp_path / "weights.safetensors", **f64)
    got64 = np.asarray(jax.jit(cnnjax.create_model(name, **f64).apply)(
        variables64, images.astype(np.float64)))
  error = _relative_error(got64, exact)
  assert error < EXACT, f"{name} in float64: {error:.2e} of the largest logit"

  saved = weights.save_weights(name, variables, tmp_path / "cnnjax.safetensors")
  again = torch_models.FULL[name]()
  if name == "googlenet":  # cnnjax's googlenet has no auxiliary heads to write
    again = torch_models.FULL[name](aux_logits=False)
  again.load_state_dict(safetensors_torch.load_file(saved), strict=True)
  error = _relative_error(torch_models.logits(again.eval(), images), want)
  assert error < TOLERANCE, f"{name} after save_weights, in PyTorch: {error:.2e}"


class _Payload:
  def __reduce__(self):
    return (print, ("pickled code ran",))


def test_a_pth_that_needs_pickled_code_is_refused(tmp_path, capsys):
  path = tmp_path / "evil.pth"
  torch.save({"conv1.weight": torch.zeros(1), "payload": _Payload()}, path,
             pickle_protocol=pickle.DEFAULT_PROTOCOL)
  with pytest.raises(WeightsError, match=r"weights_only=True"):
    weights.load_weights("resnet18", path)
  assert "pickled code ran" not in capsys.readouterr().out


def test_a_truncated_pth_is_refused(tmp_path):
  path = tmp_path / "cut.pth"
  torch.save({"fc.weight": torch.zeros(1000, 512)}, path)
  path.write_bytes(path.read_bytes()[:-200])
  with pytest.raises(WeightsError, match="cannot be read as a PyTorch file"):
    weights.load_weights("resnet18", path)
