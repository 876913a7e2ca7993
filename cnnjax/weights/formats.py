"""Reading and writing state dicts: safetensors, PyTorch pickles, .npz and mappings.

Everything becomes `{key: numpy array}`. The safetensors reader and writer
are written here against the format's specification (an 8-byte header size,
a JSON header of dtypes, shapes and byte ranges, then the bytes): they need
no PyTorch, read bfloat16 through ml_dtypes, and check every byte range, so a
truncated file is refused rather than read in part. PyTorch files are read
with `torch.load(weights_only=True)`, which refuses pickled code.
"""

from __future__ import annotations

import json
import os
import pathlib
import struct
import zipfile
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

from cnnjax import fileio


class WeightsError(ValueError):
  """A checkpoint that cannot be loaded as asked: names the key, shapes and the fix."""


_SAFETENSORS_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_SAFETENSORS_NAMES = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}
# The specification caps the header at 100 MB; a larger size means a file of another kind.
_MAX_HEADER = 100_000_000
PYTORCH_SUFFIXES = (".pth", ".pt", ".bin")


def read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
  """The tensors of the safetensors file `path` as NumPy arrays, by name. Raises
  `WeightsError` for a truncated or malformed file, naming it."""
  data = path.read_bytes()
  where = f"{path} is not a complete safetensors file"
  if len(data) < 8:
    raise WeightsError(f"{where}: {len(data)} bytes, shorter than the header size field")
  (header_size,) = struct.unpack("<Q", data[:8])
  if header_size > min(_MAX_HEADER, len(data) - 8):
    raise WeightsError(f"{where}: its header would be {header_size} bytes of a {len(data)}-byte "
                       "file (truncated, or not safetensors)")
  try:
    header = json.loads(data[8:8 + header_size])
  except (UnicodeDecodeError, json.JSONDecodeError) as error:
    raise WeightsError(f"{where}: the header is not JSON ({error})") from None
  if not isinstance(header, dict):
    raise WeightsError(f"{where}: the header is not a JSON object")
  buffer = memoryview(data)[8 + header_size:]
  tensors, end_of_data = {}, 0
  for key, entry in header.items():
    if key == "__metadata__":
      continue
    try:
      dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
      shape = tuple(int(n) for n in entry["shape"])
      begin, end = (int(n) for n in entry["data_offsets"])
    except (KeyError, TypeError, ValueError):
      raise WeightsError(f"{where}: tensor {key!r} has an unreadable entry {entry!r}") from None
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if end - begin != expected or begin < 0:
      raise WeightsError(f"{where}: tensor {key!r} of shape {shape} needs {expected} bytes, its "
                         f"range {begin}..{end} holds {end - begin}")
    if end > len(buffer):
      raise WeightsError(f"{where}: tensor {key!r} ends at byte {end} of the data, which has only "
                         f"{len(buffer)} (the file is truncated)")
    tensors[key] = np.frombuffer(buffer[begin:end], dtype=dtype).reshape(shape)
    end_of_data = max(end_of_data, end)
  if end_of_data != len(buffer):
    raise WeightsError(f"{where}: {len(buffer) - end_of_data} bytes after the last tensor")
  return tensors


def safetensors_bytes(tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> bytes:
  """The safetensors encoding of `tensors` (C order, keys sorted, header padded to 8 bytes)."""
  header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
  chunks, offset = [], 0
  for key in sorted(tensors):
    array = np.asarray(tensors[key], order="C")  # (ascontiguousarray makes scalars 1-d)
    if array.dtype not in _SAFETENSORS_NAMES:
      raise WeightsError(f"tensor {key!r} has dtype {array.dtype}, which safetensors cannot hold")
    raw = array.tobytes()
    header[key] = {"dtype": _SAFETENSORS_NAMES[array.dtype], "shape": list(array.shape),
                   "data_offsets": [offset, offset + len(raw)]}
    chunks.append(raw)
    offset += len(raw)
  encoded = json.dumps(header, separators=(",", ":")).encode()
  encoded += b" " * (-len(encoded) % 8)
  return struct.pack("<Q", len(encoded)) + encoded + b"".join(chunks)


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
  """Writes `tensors` (name -> array) and string `metadata` as a safetensors file at
  `path`, atomically: a reader never sees half a file."""
  fileio.write_atomically(path, safetensors_bytes(tensors, metadata))


def _tensor_to_numpy(value: Any) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch.Tensor, without importing torch
    value = value.detach().cpu()
    if str(value.dtype) == "torch.bfloat16":
      return value.float().numpy().astype(ml_dtypes.bfloat16)
    return value.numpy()
  return np.asarray(value)


def read_pytorch(path: pathlib.Path) -> dict[str, Any]:
  try:
    import torch  # noqa: PLC0415
  except ImportError:
    raise WeightsError(
        f"{path} is a PyTorch pickle and reading it needs PyTorch, which is not installed. "
        "Install torch, or convert the file to safetensors where torch is installed: "
        "python -c \"import torch, safetensors.torch as s; "
        f"s.save_file(torch.load('{path.name}', weights_only=True), "
        f"'{path.stem}.safetensors')\"") from None
  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as error:  # torch raises several types for the same kinds of damage
    text = str(error)
    if "weights_only" in text or "Unsupported global" in text or "Unpickler" in text:
      raise WeightsError(
          f"{path} needs pickled code beyond tensors to load, and cnnjax loads PyTorch files "
          "only with torch.load(weights_only=True). Save just the state dict "
          "(torch.save(model.state_dict(), path)) or convert it to safetensors. "
          f"PyTorch said: {text.splitlines()[0]}") from None
    raise WeightsError(f"{path} cannot be read as a PyTorch file (truncated or damaged?): "
                       f"{text.splitlines()[0] if text else type(error).__name__}") from None


def read_npz(path: pathlib.Path) -> dict[str, np.ndarray]:
  try:
    with np.load(path, allow_pickle=False) as archive:
      return {key: archive[key] for key in archive.files}
  except (zipfile.BadZipFile, ValueError, OSError, EOFError) as error:
    raise WeightsError(f"{path} cannot be read as .npz (truncated or damaged?): {error}") from None


def _unwrap(state: Mapping[str, Any]) -> Mapping[str, Any]:
  """The state dict inside common checkpoint wrappers: {"state_dict": ...}, {"model": ...}."""
  for key in ("state_dict", "model", "model_state_dict"):
    inner = state.get(key)
    if isinstance(inner, Mapping) and not any(hasattr(v, "shape") for v in state.values()):
      return _unwrap(inner)
  return state


def read(source: Any) -> dict[str, np.ndarray]:
  """A state dict `{key: numpy array}` from a path or a mapping (see `cnnjax.load_weights`)."""
  if isinstance(source, Mapping):
    state = source
  elif isinstance(source, (str, os.PathLike)):
    path = pathlib.Path(source).expanduser()
    if not path.is_file():
      raise WeightsError(f"no weights file at {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
      state = read_safetensors(path)
    elif suffix in PYTORCH_SUFFIXES:
      state = read_pytorch(path)
    elif suffix == ".npz":
      state = read_npz(path)
    else:
      raise WeightsError(f"{path}: unknown weights format {suffix!r}; use .safetensors, "
                         f"{', '.join(PYTORCH_SUFFIXES)} or .npz")
  else:
    raise WeightsError(f"weights must be a path or a mapping of names to arrays, got "
                       f"{type(source).__name__}")
  if not isinstance(state, Mapping):
    raise WeightsError(f"{source} holds a {type(state).__name__}, not a state dict")
  state = _unwrap(state)
  arrays = {}
  for key, value in state.items():
    if not isinstance(key, str):
      raise WeightsError(f"state dict keys must be strings, got {key!r}")
    if not hasattr(value, "shape"):
      raise WeightsError(f"state dict entry {key!r} is a {type(value).__name__}, not a tensor")
    arrays[key] = _tensor_to_numpy(value)
  keys = list(arrays)
  # nn.DataParallel and DistributedDataParallel prefix every key.
  for prefix in ("module.", "_orig_mod."):
    if keys and all(k.startswith(prefix) for k in keys):
      arrays = {k[len(prefix):]: v for k, v in arrays.items()}
  return arrays
