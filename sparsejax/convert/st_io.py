"""safetensors files of a Hugging Face model folder, read lazily and written in shards.

``Reader(dir)`` opens ``model.safetensors``, or the shards named by
``model.safetensors.index.json``, without reading any tensor: ``lazy(name, shape, read)``
views return only the slice a device asks for (``host_to_device`` slices them per device), so a
model is never materialised whole on the host. ``write(dir, tensors)`` writes an iterator of
(name, array) pairs into shards of at most ``max_shard_bytes`` (one ``model.safetensors`` when it
fits, else ``model-0000i-of-0000n.safetensors`` + the index), holding one shard in memory.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Callable, Iterable

import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "BF16": ml_dtypes.bfloat16}


class Reader:
  """Tensor names -> lazily sliceable safetensors views of one HF model folder."""

  def __init__(self, folder: str | pathlib.Path):
    folder = pathlib.Path(folder)
    if (folder / INDEX).is_file():
      weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
      files = sorted(set(weight_map.values()))
    elif (folder / SINGLE).is_file():
      files = [SINGLE]
    else:
      raise FileNotFoundError(f"{folder} holds neither {SINGLE} nor {INDEX}: point --from-hf at "
                              "a Hugging Face model folder saved with safetensors")
    self._files = {f: safe_open(str(folder / f), framework="numpy") for f in files}
    self._where = {name: f for f, h in self._files.items() for name in h.keys()}

  def names(self) -> set[str]:
    return set(self._where)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._files[self._where[name]].get_slice(name).get_shape())

  def dtype(self, name: str):
    code = self._files[self._where[name]].get_slice(name).get_dtype()
    if code not in _DTYPES:
      raise ValueError(f"tensor {name} has dtype {code}; only float tensors convert")
    return np.dtype(_DTYPES[code])

  def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
    """``tensor[index]`` read from disk (only that slice)."""
    return np.asarray(self._files[self._where[name]].get_slice(name)[index])

  def full(self, name: str) -> np.ndarray:
    return self.read(name, tuple(slice(0, n) for n in self.shape(name)))


@dataclasses.dataclass(frozen=True)
class Lazy:
  """An array-like of ``shape`` / ``dtype`` whose ``[index]`` calls ``read(bounds)`` with one
  (start, stop) pair per axis (what ``jax.make_array_from_callback`` slices)."""
  shape: tuple[int, ...]
  dtype: np.dtype
  fetch: Callable[[tuple[tuple[int, int], ...]], np.ndarray]

  def __getitem__(self, index) -> np.ndarray:
    index = index if isinstance(index, tuple) else (index,)
    index = index + (slice(None),) * (len(self.shape) - len(index))
    bounds = []
    for s, n in zip(index, self.shape):
      start, stop, step = s.indices(n)
      if step != 1:
        raise ValueError("lazy safetensors views take contiguous slices only")
      bounds.append((start, stop))
    out = self.fetch(tuple(bounds))
    if out.shape != tuple(b - a for a, b in bounds):
      raise ValueError(f"lazy read returned shape {out.shape} for the slice {bounds}")
    return out

  def __array__(self, dtype=None, copy=None):
    out = self[tuple(slice(None) for _ in self.shape)]
    return out if dtype is None else out.astype(dtype)


def write(folder: str | pathlib.Path, tensors: Iterable[tuple[str, np.ndarray]],
          max_shard_bytes: int = 5 << 30) -> list[str]:
  """Write (name, array) pairs as HF safetensors shards; returns the file names written."""
  folder = pathlib.Path(folder)
  current: dict[str, np.ndarray] = {}
  parts: list[str] = []
  weight_map: dict[str, int] = {}
  size = total = 0

  def flush() -> None:
    parts.append(f"part-{len(parts):05d}.safetensors")
    save_file(current, str(folder / parts[-1]), metadata={"format": "pt"})
    current.clear()

  for name, array in tensors:
    array = np.ascontiguousarray(array)
    if current and size + array.nbytes > max_shard_bytes:
      flush()
      size = 0
    current[name] = array
    weight_map[name] = len(parts)
    size += array.nbytes
    total += array.nbytes
  if current or not parts:
    flush()
  if len(parts) == 1:
    (folder / parts[0]).rename(folder / SINGLE)
    return [SINGLE]
  final = [f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors" for i in range(len(parts))]
  for old, new in zip(parts, final):
    (folder / old).rename(folder / new)
  index = {"metadata": {"total_size": total},
           "weight_map": {k: final[i] for k, i in sorted(weight_map.items())}}
  (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
  return final
