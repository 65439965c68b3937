"""Helpers for the checkpoint tests: the fixtures under tests/data/checkpoints (made by the real
tools with scripts/make_fixtures.py) and an independent safetensors reader/writer (struct +
json + ml_dtypes; it shares no code with jax_nvfp4.checkpoint)."""

import json
import os
import shutil
import struct

import ml_dtypes
import numpy as np

DATA = os.path.join(os.path.dirname(__file__), "data", "checkpoints")
MODELOPT = ("modelopt_nvfp4_dense", "modelopt_w4a16_sharded", "modelopt_mixed_moe")
COMPRESSED = ("ct_nvfp4a16_dense", "ct_nvfp4_dense", "ct_nvfp4a16_moe")

_DT = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32, "U8": np.uint8,
       "F8_E4M3": ml_dtypes.float8_e4m3fn, "I64": np.int64, "I32": np.int32}
_NAME = {np.dtype(v): k for k, v in _DT.items()}


def fixture(name: str) -> str:
  return os.path.join(DATA, name)


def read_file(path: str) -> dict[str, np.ndarray]:
  with open(path, "rb") as f:
    raw = f.read()
  (n,) = struct.unpack("<Q", raw[:8])
  header = json.loads(raw[8:8 + n])
  header.pop("__metadata__", None)
  out = {}
  for name, e in header.items():
    b, end = e["data_offsets"]
    out[name] = np.frombuffer(raw[8 + n + b:8 + n + end], _DT[e["dtype"]]).reshape(e["shape"])
  return out


def read_dir(path: str) -> dict[str, np.ndarray]:
  """Every tensor of a checkpoint directory (model*.safetensors; not reference.safetensors)."""
  out = {}
  for f in sorted(os.listdir(path)):
    if f.startswith("model") and f.endswith(".safetensors"):
      out.update(read_file(os.path.join(path, f)))
  return out


def reference(name: str) -> dict[str, np.ndarray]:
  """``<module>.fake_quant`` (the tool's dequantization, bf16) and ``<module>.original``."""
  return read_file(os.path.join(fixture(name), "reference.safetensors"))


def ref_modules(ref: dict) -> list[str]:
  return sorted(k[:-len(".fake_quant")] for k in ref if k.endswith(".fake_quant"))


def write_file(path: str, tensors: dict[str, np.ndarray]) -> None:
  header, blobs, off = {}, [], 0
  for name, a in tensors.items():
    a = np.asarray(a, order="C")
    header[name] = {"dtype": _NAME[np.dtype(a.dtype)], "shape": list(a.shape),
                    "data_offsets": [off, off + a.nbytes]}
    off += a.nbytes
    blobs.append(a.tobytes())
  raw = json.dumps(header).encode()
  raw += b" " * (-len(raw) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


def copy(name: str, dst: str) -> str:
  """A writable copy of fixture ``name`` (without its reference file) at ``dst``."""
  shutil.copytree(fixture(name), dst, ignore=shutil.ignore_patterns("reference.safetensors"))
  return dst


def bits(a) -> np.ndarray:
  a = np.asarray(a, order="C")
  return a.view(np.dtype(f"u{a.dtype.itemsize}"))


def assert_same_bits(got, want, *, zero_sign: bool = True, what: str = "") -> None:
  """Bit equality; with ``zero_sign=False`` a +0/-0 difference is allowed (values equal)."""
  got, want = np.asarray(got), np.asarray(want)
  assert got.shape == want.shape and got.dtype == want.dtype, (what, got.shape, want.shape,
                                                                got.dtype, want.dtype)
  differ = bits(got) != bits(want)
  if not zero_sign:
    differ &= ~((got.astype(np.float32) == 0) & (want.astype(np.float32) == 0))
  assert not differ.any(), (f"{what}: {int(differ.sum())} of {differ.size} elements differ, "
                            f"e.g. {got[differ][:4]} vs {want[differ][:4]}")
