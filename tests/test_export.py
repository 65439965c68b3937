"""``jax.export`` of computations that call the kernels (no GPU needed: exported for the cuda
and cpu platforms from this host, run on the CPU).

The artifact names jax_nvfp4's FFI targets, which carry no JAX compatibility guarantee, so
``jax.export`` refuses it unless ``export_disabled_checks()`` is passed; exported for
``("cpu", "cuda")`` one module holds both lowerings, and on the CPU it runs the reference.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import jax_nvfp4 as nf
from jax_nvfp4 import backend as B
from jax_nvfp4 import _ffi


def _layer():
  wd = nf.quantize(jax.random.normal(jax.random.key(0), (96, 64)))
  w13 = nf.quantize(jax.random.normal(jax.random.key(1), (4, 96, 64)))
  w2 = nf.quantize(jax.random.normal(jax.random.key(2), (4, 64, 48)))
  p = (nf.prepare(wd), nf.prepare(w13, gate_up_pairs=True), nf.prepare(w2))
  x = jax.random.normal(jax.random.key(3), (5, 64), jnp.bfloat16)
  logits = jax.random.normal(jax.random.key(4), (5, 4), jnp.float32)

  def f(x, logits, p):
    h = nf.nvfp4_matmul(x, p[0])[:, :64]
    return nf.fused_moe(h, p[1], p[2], router_logits=logits, top_k=2)
  return f, (x, logits, p)


def test_export_needs_the_disabled_checks_and_runs_on_the_cpu():
  f, args = _layer()
  if not {B.DENSE_TARGET, B.MOE_TARGET} <= _ffi.REGISTERED:
    pytest.skip("the CUDA kernels are not built: the cuda lowering would be the reference")
  with pytest.raises(ValueError, match="custom calls whose targets have no compatibility"):
    export.export(jax.jit(f), platforms=("cpu", "cuda"))(*args)
  exp = export.export(jax.jit(f), platforms=("cpu", "cuda"),
                      disabled_checks=nf.export_disabled_checks())(*args)
  text = exp.mlir_module()
  for target in (B.DENSE_TARGET, B.MOE_TARGET):
    assert target in text
  assert set(B.cuda_targets()) >= _ffi.REGISTERED  # every handler the build has is covered
  want = np.asarray(jax.jit(f)(*args))
  np.testing.assert_array_equal(np.asarray(exp.call(*args)), want)
  try:
    restored = export.deserialize(exp.serialize())
  except ImportError:  # jax's serialization needs flatbuffers, not one of our dependencies
    return
  np.testing.assert_array_equal(np.asarray(restored.call(*args)), want)
