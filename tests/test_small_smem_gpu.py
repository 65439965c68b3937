"""The launches of a GPU with 99 KB of shared memory per block (sm_86 / sm_89: A10, L4) on the
lent Hopper GPU (skipped without a GPU).

The unsliced blocks of token tiles 2, 4 and 8 take 100-104 KB, so there ``nvfp4_matmul`` and
``fused_moe`` fall back to smaller tiles (``ops.dense.fitting_m_tile``) and an explicit
``block_m`` that cannot launch is refused at trace time. ``JAX_NVFP4_SMEM_LIMIT_KB=99`` gives
the kernels' host code that limit (csrc/nvfp4_kernel.cuh ``smem_limit``); it is read once per
device and process, so the checks run in a fresh process.
"""

import os
import subprocess
import sys
import textwrap

import pytest

from jax_nvfp4 import _ffi

pytestmark = pytest.mark.gpu

CHILD = textwrap.dedent("""
    import jax, jax.numpy as jnp, ml_dtypes, numpy as np
    import jax_nvfp4 as nf
    from jax_nvfp4 import _ffi
    from jax_nvfp4.ops import dense
    from tests import numpy_moe_reference as ref
    from tests import numpy_reference as npref
    from tests.test_moe import random_experts

    # What the 99 KB limit leaves: the unsliced blocks of m_tile 1 only (44 KB).
    for moe in (False, True):
      query = _ffi.moe_blocks_per_sm if moe else _ffi.blocks_per_sm
      assert query(1, True) >= 1, moe
      assert [query(mt, True) for mt in (2, 4, 8)] == [0, 0, 0], moe
      assert [dense.fitting_m_tile(mt, moe) for mt in (1, 2, 4, 8)] == [1, 1, 1, 1]

    rng = np.random.default_rng(7)
    def rel_l2(a, b):
      return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    # Dense: M past one 8-row tile, N and K off the tile, poisoned output.
    n, k = 1000, 1664
    packed = rng.integers(0, 256, size=(n, k // 2), dtype=np.uint8)
    scales = rng.uniform(2.0**-6, 8.0, size=(n, k // 16)).astype(ml_dtypes.float8_e4m3fn)
    w = nf.NVFP4Weight(jnp.asarray(packed), jnp.asarray(scales), jnp.float32(0.03))
    wd = npref.dequantize(packed, scales, np.float32(0.03))
    p = nf.prepare(w)
    for m in (9, 16, 33, 64, 255):
      assert dense.choose_launch(m, n, k)[1] == 1 and dense.choose_k_slices(m, n, k) == 1
      x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
      poison = jnp.full((m, n), jnp.nan, jnp.bfloat16).block_until_ready()
      del poison
      out = np.asarray(jax.jit(nf.nvfp4_matmul)(x, p), np.float64)
      want = np.asarray(x, np.float64) @ wd.T
      assert np.isfinite(out).all(), m
      assert rel_l2(out, want) <= 5e-3, (m, rel_l2(out, want))
    text = jax.jit(nf.nvfp4_matmul).lower(jnp.zeros((64, k), jnp.bfloat16), p).as_text()
    assert "jax_nvfp4_gemm_cuda" in text and "m_tile = 1 " in text, text[-2000:]

    # MoE: a batch whose block_m choose_block_m puts at 32 runs at 8.
    e, h, i, t, top_k = 8, 256, 320, 128, 2
    assert nf.choose_block_m(t, top_k, e) == 32
    w13 = random_experts(rng, e, 2 * i, h, out_std=2.0)
    w2 = random_experts(rng, e, h, i)
    x = jnp.asarray(rng.standard_normal((t, h)), jnp.bfloat16)
    logits = jnp.asarray(rng.standard_normal((t, e)), jnp.float32)
    tw, ti = nf.route(logits, nf.RoutingConfig(top_k=top_k))
    fused = jax.jit(lambda *a: nf.fused_moe(a[0], a[1], a[2], topk_weights=a[3], topk_ids=a[4]))
    args = (x, nf.prepare(w13), nf.prepare(w2), tw, ti)
    text = jax.jit(lambda *a: nf.fused_moe(a[0], a[1], a[2], topk_weights=a[3],
                                           topk_ids=a[4])).lower(*args).as_text()
    assert "jax_nvfp4_moe_gemm_cuda" in text and "block_m = 8 " in text
    poison = jnp.full((t, h), jnp.nan, jnp.bfloat16).block_until_ready()
    del poison
    out = np.asarray(fused(*args), np.float64)
    want = ref.moe(np.asarray(x, np.float64), ref.dequantize_experts(w13),
                   ref.dequantize_experts(w2), np.asarray(tw), np.asarray(ti))
    assert np.isfinite(out).all() and rel_l2(out, want) <= 5e-3, rel_l2(out, want)

    # An explicit block_m that cannot launch: a clear error before anything runs.
    try:
      nf.fused_moe(*args[:3], topk_weights=tw, topk_ids=ti, block_m=32)
    except ValueError as err:
      assert "block_m = 32" in str(err) and "block_m <= 8 fits" in str(err), err
    else:
      raise AssertionError("block_m = 32 was not refused")
    print("OK")
""")


def test_a_99_kb_gpu_falls_back_to_tiles_that_fit():
  if not _ffi.cuda_kernels_built():
    pytest.skip("the CUDA kernels are not built")
  # The parent holds its own GPU memory: the child allocates as it goes.
  env = dict(os.environ, JAX_NVFP4_SMEM_LIMIT_KB="99", XLA_PYTHON_CLIENT_PREALLOCATE="false")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  res = subprocess.run([sys.executable, "-c", CHILD], env=env, cwd=root, capture_output=True,
                       text=True, timeout=600)
  assert res.returncode == 0 and "OK" in res.stdout, res.stdout[-3000:] + res.stderr[-5000:]
