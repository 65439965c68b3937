import os
import zlib

import numpy as np
import pytest


def _has_gpu_kernels() -> bool:
  import jax
  from jax_nvfp4 import _ffi
  try:
    gpu = any(d.platform == "gpu" for d in jax.devices())
  except RuntimeError:
    gpu = False
  return gpu and _ffi.cuda_kernels_built()


def pytest_collection_modifyitems(config, items):
  if _has_gpu_kernels():
    return
  skip = pytest.mark.skip(reason="needs an NVIDIA GPU and jax_nvfp4 built with CUDA")
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(skip)


@pytest.fixture
def rng(request):
  # A fresh, but reproducible, stream per test.
  seed = zlib.crc32(request.node.nodeid.encode())
  return np.random.default_rng(seed)
