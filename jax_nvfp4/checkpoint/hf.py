"""Hugging Face checkpoint directories: safetensors files, the shard index, the JSON configs.

Only ``.safetensors`` files are read, never pickle-based files (``.bin``, ``.pt``, ``.pth``,
``.ckpt``): unpickling runs arbitrary code.

We parse the safetensors format ourselves (8-byte little-endian header length, a JSON header
``{name: {dtype, shape, data_offsets: [begin, end]}}`` plus optional ``__metadata__``, then the
raw little-endian tensor bytes) and map the files with ``np.memmap``: reading a header touches no
tensor data, and a tensor's bytes are paged in only when its array is used. The ``safetensors``
package's NumPy API cannot return the tensors NVFP4 checkpoints hold (checked with safetensors
0.8.0: ``F8_E4M3`` raises ``AttributeError: module 'numpy' has no attribute 'float8_e4m3fn'``,
``BF16`` raises ``TypeError: data type 'bfloat16' not understood``); ml_dtypes gives NumPy those
dtypes here, so jax_nvfp4 does not need the package at all (the tests use it as a cross-check).

Every problem raises ``CheckpointError`` (a ``ValueError``) naming the file and tensor.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import ml_dtypes
import numpy as np

#: safetensors dtype names -> NumPy dtypes (ml_dtypes for the 16- and 8-bit floats).
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_), "U8": np.dtype(np.uint8), "I8": np.dtype(np.int8),
    "U16": np.dtype(np.uint16), "I16": np.dtype(np.int16), "U32": np.dtype(np.uint32),
    "I32": np.dtype(np.int32), "U64": np.dtype(np.uint64), "I64": np.dtype(np.int64),
    "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype(np.float32), "F64": np.dtype(np.float64),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
DTYPE_NAMES: dict[np.dtype, str] = {v: k for k, v in DTYPES.items()}

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_MAX_HEADER = 100 * 2**20  # a header larger than this is not a sane checkpoint


class CheckpointError(ValueError):
  """A checkpoint that cannot be loaded: missing, extra or inconsistent tensors or config."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """Where one tensor lives. ``begin``/``end`` are absolute byte offsets in ``file``."""

  name: str
  file: str
  dtype: str  # safetensors name, e.g. "F8_E4M3"
  shape: tuple[int, ...]
  begin: int
  end: int

  @property
  def np_dtype(self) -> np.dtype:
    return DTYPES[self.dtype]

  @property
  def nbytes(self) -> int:
    return self.end - self.begin

  def describe(self) -> str:
    return f"{self.dtype} {list(self.shape)}"


def read_header(path: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
  """Parses and validates one safetensors file's header (reads no tensor data).

  Returns ``(tensors, metadata)``. Raises ``CheckpointError`` for a truncated file, a header
  that is not JSON, an unknown dtype, or offsets that disagree with the shapes or overlap.
  """
  fname = os.path.basename(path)
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise CheckpointError(f"{fname}: not a safetensors file (only {size} bytes)")
    (n,) = struct.unpack("<Q", head)
    if n > min(_MAX_HEADER, size - 8):
      raise CheckpointError(f"{fname}: header length {n} exceeds the file ({size} bytes)")
    raw = f.read(n)
  try:
    header = json.loads(raw)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{fname}: the safetensors header is not valid JSON ({e})") from None
  if not isinstance(header, dict):
    raise CheckpointError(f"{fname}: the safetensors header must be a JSON object")
  metadata = header.pop("__metadata__", None) or {}
  if not isinstance(metadata, dict):
    raise CheckpointError(f"{fname}: __metadata__ must be an object of strings")
  data_start = 8 + n
  data_size = size - data_start
  tensors: dict[str, TensorInfo] = {}
  spans = []
  for name, entry in header.items():
    where = f"{fname}: tensor {name!r}"
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
      raise CheckpointError(f"{where}: header entry must have dtype, shape and data_offsets, "
                            f"got {entry!r}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPES:
      raise CheckpointError(f"{where}: unknown dtype {dtype!r} (known: {sorted(DTYPES)})")
    if (not isinstance(shape, list) or
        not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
      raise CheckpointError(f"{where}: shape must be a list of non-negative ints, got {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2 or
        not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
      raise CheckpointError(f"{where}: data_offsets must be [begin, end], got {offsets!r}")
    begin, end = offsets
    want = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize
    if not 0 <= begin <= end <= data_size or end - begin != want:
      raise CheckpointError(f"{where}: data_offsets {offsets} do not hold {dtype} {shape} "
                            f"({want} bytes) inside the {data_size} data bytes")
    spans.append((begin, end, name))
    tensors[name] = TensorInfo(name, path, dtype, tuple(shape), data_start + begin,
                               data_start + end)
  spans.sort()
  reach, reach_name = 0, None  # the furthest end so far, and whose
  for begin, end, name in spans:
    if end > begin:
      if begin < reach:
        raise CheckpointError(f"{fname}: tensors {reach_name!r} and {name!r} overlap")
      reach, reach_name = end, name
  return tensors, {str(k): str(v) for k, v in metadata.items()}


def load_json(path: str) -> Any:
  """Reads a JSON file; a syntax error raises ``CheckpointError`` naming the file and place."""
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{os.path.basename(path)} is not valid JSON: {e.msg} at line "
                          f"{e.lineno} column {e.colno}") from None
  except UnicodeDecodeError as e:
    raise CheckpointError(f"{os.path.basename(path)} is not UTF-8 text ({e})") from None


class CheckpointFiles:
  """The tensors of a checkpoint directory: ``model.safetensors`` or the sharded index.

  ``tensors`` maps every tensor name to its ``TensorInfo`` (headers only); ``read(name)``
  returns a read-only NumPy view of the memory-mapped file (no copy).
  """

  def __init__(self, path: str):
    if not os.path.isdir(path):
      raise CheckpointError(f"{path!r} is not a checkpoint directory")
    self.path = path
    entries = sorted(os.listdir(path))
    index = os.path.join(path, INDEX_FILE)
    if os.path.exists(index):
      files = self._files_from_index(index)
    elif SINGLE_FILE in entries:
      files = [SINGLE_FILE]
    else:
      pickles = [e for e in entries if e.endswith(PICKLE_SUFFIXES)]
      if pickles:
        raise CheckpointError(
            f"{path}: found only pickle-based weights ({', '.join(pickles)}); jax_nvfp4 reads "
            f".safetensors only (unpickling can run arbitrary code). Convert the checkpoint "
            f"to safetensors first.")
      others = [e for e in entries if e.endswith(".safetensors")]
      raise CheckpointError(
          f"{path}: no {SINGLE_FILE} and no {INDEX_FILE}" +
          (f" (other safetensors files there: {', '.join(others)})" if others else ""))
    self.files = files
    self.metadata: dict[str, dict[str, str]] = {}
    self.tensors: dict[str, TensorInfo] = {}
    for fname in files:
      tensors, meta = read_header(os.path.join(path, fname))
      self.metadata[fname] = meta
      for name, info in tensors.items():
        if name in self.tensors:
          raise CheckpointError(f"tensor {name!r} is stored twice: in "
                                f"{os.path.basename(self.tensors[name].file)} and {fname}")
        self.tensors[name] = info
    if self._weight_map is not None:
      self._check_index()
    self._maps: dict[str, np.memmap] = {}

  _weight_map: dict[str, str] | None = None

  def _files_from_index(self, index: str) -> list[str]:
    data = load_json(index)
    wmap = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wmap, dict) or not all(isinstance(v, str) for v in wmap.values()):
      raise CheckpointError(f"{INDEX_FILE}: needs a 'weight_map' object of tensor name -> file")
    files = sorted(set(wmap.values()))
    for fname in files:
      if os.path.basename(fname) != fname or not fname.endswith(".safetensors"):
        raise CheckpointError(f"{INDEX_FILE}: shard {fname!r} must be a .safetensors file name "
                              "in the checkpoint directory")
      if not os.path.exists(os.path.join(self.path, fname)):
        raise CheckpointError(f"{INDEX_FILE} names shard {fname!r}, which is missing")
    self._weight_map = dict(wmap)
    return files

  def _check_index(self) -> None:
    wmap = self._weight_map
    for name, fname in wmap.items():
      info = self.tensors.get(name)
      if info is None:
        raise CheckpointError(f"missing tensor {name!r}: {INDEX_FILE} puts it in {fname}, "
                              "which does not hold it")
      if os.path.basename(info.file) != fname:
        raise CheckpointError(f"tensor {name!r}: {INDEX_FILE} puts it in {fname}, but it is in "
                              f"{os.path.basename(info.file)}")
    extra = sorted(set(self.tensors) - set(wmap))
    if extra:
      more = f" (and {len(extra) - 1} more)" if extra[1:] else ""
      raise CheckpointError(f"extra tensor {extra[0]!r} in "
                            f"{os.path.basename(self.tensors[extra[0]].file)} is not in "
                            f"{INDEX_FILE}{more}")

  def read(self, name: str) -> np.ndarray:
    """The tensor ``name`` as a read-only NumPy array backed by the memory-mapped file."""
    info = self.tensors.get(name)
    if info is None:
      raise CheckpointError(f"missing tensor {name!r}")
    mm = self._maps.get(info.file)
    if mm is None:
      mm = self._maps[info.file] = np.memmap(info.file, dtype=np.uint8, mode="r")
    return mm[info.begin:info.end].view(info.np_dtype).reshape(info.shape)

  @property
  def total_bytes(self) -> int:
    return sum(t.nbytes for t in self.tensors.values())


# ------------------------------------------------------------------------------- writing

def write_safetensors(path: str, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
  """Writes ``tensors`` as one safetensors file (little-endian, header padded to 8 bytes).

  Tensors are laid out by decreasing item size, then name, so every tensor starts at a
  multiple of its item size.
  """
  order = sorted(tensors, key=lambda k: (-np.dtype(tensors[k].dtype).itemsize, k))
  header: dict[str, Any] = {}
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  offset = 0
  arrays = []
  for name in order:
    a = np.asarray(tensors[name], order="C")  # ascontiguousarray would make a scalar 1-D
    dt = np.dtype(a.dtype)
    if dt not in DTYPE_NAMES:
      raise TypeError(f"write_safetensors: tensor {name!r} has dtype {dt}, which safetensors "
                      f"cannot store")
    if dt.byteorder == ">":
      a = a.astype(dt.newbyteorder("<"))
    header[name] = {"dtype": DTYPE_NAMES[dt], "shape": list(a.shape),
                    "data_offsets": [offset, offset + a.nbytes]}
    offset += a.nbytes
    arrays.append(a)
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for a in arrays:
      f.write(a.tobytes())
  os.replace(tmp, path)


# ------------------------------------------------------------------------------- progress

class Progress:
  """Counts bytes loaded: a tqdm bar if tqdm is installed, else a line on stderr per ~5%."""

  def __init__(self, total: int, desc: str, enabled: bool):
    self.total, self.desc, self.enabled = max(int(total), 1), desc, enabled
    self.done = 0
    self._bar = None
    self._last = -1
    self._t0 = time.perf_counter()
    if enabled:
      try:
        from tqdm.auto import tqdm
      except ImportError:
        tqdm = None
      if tqdm is not None:
        self._bar = tqdm(total=self.total, desc=desc, unit="B", unit_scale=True)

  def update(self, nbytes: int) -> None:
    if not self.enabled:
      return
    self.done += int(nbytes)
    if self._bar is not None:
      self._bar.update(int(nbytes))
      return
    pct = min(100, self.done * 100 // self.total)
    if pct // 5 != self._last // 5 or pct == 100 and self._last != 100:
      self._last = pct
      mib = self.done / 2**20
      print(f"\r{self.desc}: {pct:3d}% ({mib:.0f} MiB, {time.perf_counter() - self._t0:.0f} s)",
            end="\n" if pct == 100 else "", file=sys.stderr, flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


def iter_progress(items: Iterable, sizes: Iterable[int], desc: str,
                  enabled: bool) -> Iterator:
  """Yields ``items`` while a ``Progress`` counts ``sizes`` (bytes per item)."""
  items, sizes = list(items), list(sizes)
  bar = Progress(sum(sizes), desc, enabled)
  try:
    for item, size in zip(items, sizes):
      yield item
      bar.update(size)
  finally:
    bar.close()
