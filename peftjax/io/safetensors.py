"""safetensors files and Hugging Face weight directories, read through the ``safetensors`` package.

Files are opened with :func:`safetensors.safe_open` (framework ``"numpy"``), which parses and
validates the header. Tensor data, though, is read with one positioned read (``np.fromfile`` at
the tensor's offset) straight into a fresh array rather than copied out of the package's memory
map: pages of a map that have been touched count toward the process's resident memory until the
file is closed, so reading a whole checkpoint through the map held a second copy of the model
during loading (measured: ``benchmarks/memory.py``). A loader thus holds one tensor at a time.

Our own code covers only what the package cannot do (checked with safetensors 0.4.5 and 0.8.0):

* **Errors that name the file and the tensor.** ``SafetensorError`` names neither, and its wording
  changes between versions (``HeaderTooSmall`` in 0.4, ``header too small`` in 0.8; any truncated
  file is ``MetadataIncompleteBuffer`` / ``incomplete metadata, file not fully covered``). When
  ``safe_open`` refuses a file, :func:`read_safetensors_header` reads the header again to say what
  is wrong (``ValueError`` naming the file, and the tensor whose data is cut short); a file it finds
  nothing wrong with gets the package's own reason, after the file name.
* **float8 tensors.** Framework ``"numpy"`` cannot return F8_E4M3 / F8_E5M2 (``AttributeError:
  module 'numpy' has no attribute 'float8_e4m3fn'``); those are read at the header's offsets as
  ``ml_dtypes`` arrays. (BF16 does go through the package, but only because this module imports
  ``ml_dtypes``, which registers the NumPy dtype name ``"bfloat16"``; without it the package fails
  with ``TypeError: data type 'bfloat16' not understood``.)
* **Streaming writes.** The package's writers (``serialize_file``, ``safetensors.numpy.save_file``)
  take every tensor of a file at once, so a shard would sit in host memory whole;
  :func:`write_safetensors` writes the header first and then produces (``device_get``) and writes
  one tensor at a time, which is what keeps ``save_pretrained``'s peak at one tensor.
* **Sharded directories.** The package knows single files: ``model.safetensors.index.json`` is
  read by :class:`SafetensorsSource` and written by :func:`write_sharded`.

Example:
  >>> import tempfile
  >>> tmp = tempfile.TemporaryDirectory()
  >>> w = np.arange(6, dtype=np.float32).reshape(2, 3).astype(ml_dtypes.bfloat16)
  >>> write_safetensors(Path(tmp.name) / "x.safetensors", [("w", w.dtype, w.shape, lambda: w)],
  ...                   {"format": "pt"})
  12
  >>> f = SafetensorsFile(Path(tmp.name) / "x.safetensors")
  >>> f.get("w").dtype, f.shape("w"), f.metadata
  (dtype(bfloat16), (2, 3), {'format': 'pt'})
  >>> tmp.cleanup()
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from pathlib import Path
from typing import Callable, Optional, Sequence

import ml_dtypes  # also registers "bfloat16" with NumPy, which safe_open(framework="numpy") needs
import numpy as np
from safetensors import SafetensorError, safe_open

__all__ = ["read_safetensors_header", "SafetensorsFile", "SafetensorsSource", "write_safetensors",
           "write_sharded"]

_ST_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32), "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
#: dtypes that safe_open(framework="numpy") cannot return; read at their offsets instead.
_NOT_VIA_PACKAGE = frozenset({"F8_E4M3", "F8_E5M2"})
#: The package refuses longer headers ("header too large"); the check here agrees with it.
_MAX_HEADER = 100_000_000


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict, dict, int]:
  """Parses and validates a safetensors header (our own parser: for errors and offsets).

  Returns:
    ``(tensors, metadata, data_start)``: ``tensors[name] = (np.dtype, shape, begin, end)`` with
    offsets relative to ``data_start``.

  Raises:
    ValueError: naming ``path``, for a truncated file, a bad header length, invalid JSON, an unknown
      dtype, or offsets that do not match shapes or the file size.
  """
  path = Path(path)
  size = path.stat().st_size
  if size < 8:
    raise ValueError(f"{path}: not a safetensors file (only {size} bytes)")
  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    if n > size - 8:
      raise ValueError(f"{path}: corrupt safetensors file: header length {n} exceeds the file "
                       f"size {size}")
    if n > _MAX_HEADER:
      raise ValueError(f"{path}: corrupt safetensors file: header length {n} exceeds the limit of "
                       f"{_MAX_HEADER} bytes")
    raw = f.read(n)
  try:
    header = json.loads(raw.decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: corrupt safetensors file: header is not valid JSON ({e})") from None
  if not isinstance(header, dict):
    raise ValueError(f"{path}: corrupt safetensors file: header is not a JSON object")
  metadata = header.pop("__metadata__", None) or {}
  data_size = size - 8 - n
  tensors = {}
  for name, info in header.items():
    try:
      dt = info["dtype"]
      shape = tuple(int(s) for s in info["shape"])
      begin, end = (int(o) for o in info["data_offsets"])
    except (KeyError, TypeError, ValueError):
      raise ValueError(f"{path}: corrupt safetensors file: bad header entry for tensor {name!r}: "
                       f"{info!r}") from None
    if dt not in _ST_DTYPES:
      raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {dt!r}; supported: "
                       f"{sorted(_ST_DTYPES)}")
    nbytes = math.prod(shape) * _ST_DTYPES[dt].itemsize
    if not (0 <= begin <= end <= data_size) or end - begin != nbytes:
      raise ValueError(f"{path}: corrupt safetensors file: tensor {name!r} (dtype {dt}, shape "
                       f"{list(shape)}) has data offsets [{begin}, {end}] inconsistent with its "
                       f"size {nbytes} or the data section ({data_size} bytes); the file may be "
                       "truncated")
    tensors[name] = (_ST_DTYPES[dt], shape, begin, end)
  return tensors, metadata, 8 + n


def _refused(path: Path, err: Exception) -> ValueError:
  """The ValueError for a file ``safe_open`` refused: what our parser finds, else the package's."""
  try:
    read_safetensors_header(path)
  except ValueError as ours:
    return ours
  return ValueError(f"{path}: corrupt safetensors file ({err})")


class SafetensorsFile:
  """One safetensors file, opened with :func:`safetensors.safe_open`.

  ``tensors[name]`` is ``(np.dtype, shape)``; ``get(name)`` reads that tensor (a fresh NumPy array,
  in the file's dtype). The header is validated on opening.

  Raises:
    ValueError: naming the file, for a corrupt or truncated file or an unsupported dtype.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = Path(path)
    try:
      self._f = safe_open(str(self.path), framework="numpy")
    except SafetensorError as e:
      raise _refused(self.path, e) from None
    self.metadata = dict(self._f.metadata() or {})
    self.tensors = {}
    for name in self._f.keys():
      sl = self._f.get_slice(name)
      dt = sl.get_dtype()
      if dt not in _ST_DTYPES:
        raise ValueError(f"{self.path}: tensor {name!r} has unsupported dtype {dt!r}; supported: "
                         f"{sorted(_ST_DTYPES)}")
      self.tensors[name] = (_ST_DTYPES[dt], tuple(sl.get_shape()))
    self._offsets = None

  def keys(self):
    return self.tensors.keys()

  def shape(self, name: str) -> tuple:
    return self.tensors[name][1]

  def dtype(self, name: str) -> np.dtype:
    return self.tensors[name][0]

  def get(self, name: str) -> np.ndarray:
    """The tensor as a fresh NumPy array (read at its offset: no memory map stays resident)."""
    dtype, shape = self.tensors[name]
    if self._offsets is None:
      tensors, _, start = read_safetensors_header(self.path)
      self._offsets = {k: start + v[2] for k, v in tensors.items()}
    return np.fromfile(self.path, dtype=dtype, count=math.prod(shape),
                       offset=self._offsets[name]).reshape(shape)

  def close(self):
    self._f.__exit__(None, None, None)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


class SafetensorsSource:
  """All tensors of an HF directory (single file or sharded through the index)."""

  def __init__(self, directory: Path):
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    self._where: dict[str, SafetensorsFile] = {}
    if index.exists():
      try:
        weight_map = json.loads(index.read_text())["weight_map"]
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{index}: not a valid safetensors index ({e})") from None
      opened: dict[str, SafetensorsFile] = {}
      for name, fname in weight_map.items():
        if fname not in opened:
          fpath = directory / fname
          if not fpath.exists():
            raise ValueError(f"{index}: shard {fname!r} (holding {name!r}) does not exist")
          opened[fname] = SafetensorsFile(fpath)
        if name not in opened[fname].tensors:
          raise ValueError(f"{index}: tensor {name!r} is listed in shard {fname!r} but is not in "
                           "that file")
        self._where[name] = opened[fname]
    else:
      files = sorted(directory.glob("*.safetensors"))
      if not files:
        others = [p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".h5",
                                                                      ".msgpack", ".gguf")]
        hint = (f" (found {others}: convert them to safetensors, or use from_gguf for .gguf)"
                if others else "")
        raise ValueError(f"{directory}: no *.safetensors weights{hint}")
      for fpath in files:
        sf = SafetensorsFile(fpath)
        for name in sf.keys():
          self._where[name] = sf
    self.description = str(directory)

  def names(self) -> set:
    return set(self._where)

  def shape(self, name: str) -> tuple:
    return self._where[name].shape(name)

  def get(self, name: str) -> np.ndarray:
    return self._where[name].get(name)

  def dtype(self, name: str) -> np.dtype:
    return self._where[name].dtype(name)

  def where(self, name: str) -> str:
    return str(self._where[name].path)


# ------------------------------------------------------------------------------------------------
# writing (streamed: the package's writers need every tensor of the file in memory at once)
# ------------------------------------------------------------------------------------------------

def _st_header(entries: Sequence[tuple[str, np.dtype, tuple]],
               metadata: Optional[dict]) -> tuple[bytes, int]:
  header: dict = {}
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  off = 0
  for name, dtype, shape in entries:
    dtype = np.dtype(dtype)
    if dtype not in _ST_NAMES:
      raise ValueError(f"tensor {name!r}: dtype {dtype} cannot be stored in safetensors")
    n = math.prod(shape) * dtype.itemsize
    header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [off, off + n]}
    off += n
  raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
  raw += b" " * (-len(raw) % 8)
  return raw, off


def write_safetensors(path: str | os.PathLike,
                      tensors: Sequence[tuple[str, np.dtype, tuple, Callable[[], np.ndarray]]],
                      metadata: Optional[dict] = None) -> int:
  """Writes a safetensors file, producing one tensor at a time.

  Args:
    path: output file.
    tensors: ``(name, dtype, shape, produce)``; ``produce()`` returns the array when it is written.
    metadata: string metadata (``{"format": "pt"}`` for PyTorch loaders).

  Returns:
    Number of data bytes written.
  """
  raw, total = _st_header([(n, d, s) for n, d, s, _ in tensors], metadata)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for name, dtype, shape, produce in tensors:
      arr = np.asarray(produce(), dtype=dtype, order="C")  # (ascontiguousarray makes 0-d 1-d)
      if arr.shape != tuple(shape):
        raise ValueError(f"tensor {name!r}: produced shape {arr.shape}, declared {tuple(shape)}")
      arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
      f.write(arr.reshape(-1).view(np.uint8))  # the array's own buffer: no bytes copy
      del arr
  return total


def _parse_size(size) -> int:
  if isinstance(size, int):
    return size
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)I?B?\s*", str(size).upper())
  if not m:
    raise ValueError(f"cannot parse a size from {size!r}; use an int or e.g. '2GB'")
  return int(float(m.group(1)) * 1000 ** " KMGT".index(m.group(2) or " "))


def write_sharded(directory: str | os.PathLike,
                  tensors: Sequence[tuple[str, np.dtype, tuple, Callable[[], np.ndarray]]],
                  metadata: Optional[dict] = None, *,
                  max_shard_size: int | str = "5GB") -> list[str]:
  """Writes ``model.safetensors``, or shards and an index when the tensors exceed one shard.

  Tensors (as for :func:`write_safetensors`) are written in order, one at a time; a shard is closed
  before it would exceed ``max_shard_size`` (an int, or e.g. ``"2GB"``), giving
  ``model-0000k-of-0000n.safetensors`` files and ``model.safetensors.index.json``. Earlier
  ``model*.safetensors`` files and index in ``directory`` are removed first.

  Returns:
    The names of the files written, the index last.
  """
  directory = Path(directory)
  index = directory / "model.safetensors.index.json"
  for old in list(directory.glob("model*.safetensors")) + [index]:
    if old.exists():
      old.unlink()
  limit = _parse_size(max_shard_size)
  shards: list[list] = [[]]
  size = 0
  for e in tensors:
    n = math.prod(e[2]) * np.dtype(e[1]).itemsize
    if shards[-1] and size + n > limit:
      shards.append([])
      size = 0
    shards[-1].append(e)
    size += n
  if len(shards) == 1:
    write_safetensors(directory / "model.safetensors", shards[0], metadata)
    return ["model.safetensors"]
  weight_map, total, names = {}, 0, []
  for k, shard in enumerate(shards):
    fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
    total += write_safetensors(directory / fname, shard, metadata)
    weight_map.update({e[0]: fname for e in shard})
    names.append(fname)
  index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                              indent=2))
  return names + [index.name]
