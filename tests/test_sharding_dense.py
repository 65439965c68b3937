"""nvfp4_matmul on a device mesh (jax_nvfp4/parallel/dense.py), on 8 fake CPU devices.

The multi-device checks run in a child process (tests/_multidevice.py): one worker per
partitioner (Shardy, the default, and GSPMD) computes every case and returns numbers; the tests
below assert on them. Single-device properties (prepared shards, error messages of
``weight_shardings``) run here.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_nvfp4 as nf
from jax_nvfp4.parallel import dense as pdense
from tests import _multidevice
from tests.test_prepare import code_at  # the documented bit table

N, K, M = 128, 512, 16         # 8-way N and K splits stay whole tiles (16) / chunks (64)
MESHES = ((1, 8), (2, 4), (8, 1))
SCHEMES = ("data", "column", "row", "column8", "row8", "lead_dims", "x_k_sharded")
ROW_LIKE = ("row", "row8", "x_k_sharded")
BF16_U = 2.0**-8               # unit roundoff of bfloat16 (8 significant bits)


def _random_weight(rng, n, k):
  """Random codes (all 16) and random positive block scales; global scale not 1."""
  packed = rng.integers(0, 256, size=(n, k // 2), dtype=np.uint8)
  scales = rng.uniform(2.0**-6, 8.0, size=(n, k // 16)).astype(jnp.float8_e4m3fn)
  return nf.NVFP4Weight(jnp.asarray(packed), jnp.asarray(scales), jnp.float32(0.75))


# ----------------------------------------------------------------------------- the worker

def _scheme(name, mesh):
  """(weight N axes, weight K axes, x PartitionSpec) of a scheme; x is [M, K] unless lead_dims."""
  from jax.sharding import PartitionSpec as P
  both = ("data", "model")
  return {
      "data": (None, None, P("data")),
      "column": ("model", None, P("data")),
      "row": (None, "model", P("data", "model")),
      "column8": (both, None, P()),
      "row8": (None, both, P()),
      "lead_dims": ("model", None, P(None, "data")),
      # Weight replicated, x split on K: the partitioner may slice the weight (row parallel) or
      # gather x; it must never gather the weight.
      "x_k_sharded": (None, None, P(None, "model")),
  }[name]


def _decode_prepared(qweight, qscales, gs, n, k):
  """float64 W [n, k] from the kernel layout, straight from prepare.py's layout description."""
  n16, k64 = qweight.shape[:2]
  w = np.zeros((n16 * 16, k64 * 64))
  values = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6])
  words = qweight.astype(np.uint64)
  for g in range(8):
    for t in range(4):
      for j in range(4):
        word = words[:, :, 4 * g + t, j]                                   # [n16, k64]
        for h in range(2):
          for c in range(2):
            i = h + 2 * c
            for e in range(2):
              rows = np.arange(n16)[:, None] * 16 + 8 * h + g
              cols = np.arange(k64)[None, :] * 64 + 16 * j + 8 * c + 2 * t + e
              w[rows, cols] = values[code_at(word, i, e).astype(np.int64)]
  u = qscales.astype(np.int64).reshape(n16, k64, 8, 2, 4)                   # [.., g, h, j]
  scale = (1 + (u & 7) / 8.0) * 2.0 ** ((u >> 3) - 10)
  scale = scale.transpose(0, 3, 2, 1, 4).reshape(n16 * 16, k64 * 4)         # [row, block]
  w = w * np.repeat(scale, 16, axis=1) * float(gs)
  return w[:n, :k]


def _install_opaque_gemm():
  """Replaces the CPU lowering of nvfp4_gemm_p by an opaque custom call (a host callback
  decoding the kernel layout in NumPy), as the CUDA kernel is on a GPU: XLA cannot see into it."""
  from jax.interpreters import mlir
  from jax_nvfp4.ops import dense as odense

  def host(x, qweight, qscales, gs, bias, *, n, k, has_bias):
    w = _decode_prepared(np.asarray(qweight), np.asarray(qscales), np.asarray(gs), n, k)
    out = np.asarray(x, np.float64) @ w.T + (np.asarray(bias, np.float64) if has_bias else 0)
    return out.astype(x.dtype)

  def lowering(x, qweight, qscales, gs, bias, *, n, k, has_bias, splits, m_tile, cluster,
               k_slices=1, tiles_per_block=1):
    out = jax.ShapeDtypeStruct((*x.shape[:-1], n), x.dtype)
    y = jax.pure_callback(lambda *a: host(*a, n=n, k=k, has_bias=has_bias), out, x, qweight,
                          qscales, gs, bias)
    m = int(np.prod(x.shape[:-1]))
    return y, jnp.zeros((odense.workspace_bytes(m, n, splits, m_tile, cluster),), jnp.uint8)

  mlir.register_lowering(odense.nvfp4_gemm_p, mlir.lower_fun(lowering, multiple_results=True),
                         platform="cpu")


def _error_text(fn) -> str:
  try:
    fn()
  except Exception as e:  # noqa: BLE001 -- the partitioner wraps the ValueError
    return f"{type(e).__name__}: {e}"
  return "no error"


def worker(shardy: bool):
  """Every multi-device case under one partitioner; returns JSON-able results."""
  jax.config.update("jax_use_shardy_partitioner", shardy)
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
  from tests import numpy_reference as npref
  assert len(jax.devices()) == 8

  rng = np.random.default_rng(8)
  w = _random_weight(rng, N, K)
  bias = jnp.asarray(rng.standard_normal(N), jnp.float32)
  x2 = jnp.asarray(rng.standard_normal((M, K)), jnp.bfloat16)
  x3 = x2.reshape(2, 8, K)
  w64 = npref.dequantize(np.asarray(w.packed), np.asarray(w.scales), np.asarray(w.global_scale))
  layouts = {"checkpoint": w, "prepared": nf.prepare(w)}
  weight_shapes = {f"u8[{N},{K // 2}]", f"f8e4m3fn[{N},{K // 16}]", f"u32[{N // 16},{K // 64},32,4]",
                   f"u8[{N // 16},{K // 64},64]"}
  single = {name: np.asarray(jax.jit(nf.nvfp4_matmul)(x2, lw, bias), np.float32)
            for name, lw in layouts.items()}
  ref64 = np.asarray(x2, np.float64) @ w64.T + np.asarray(bias, np.float64)
  abs_terms = np.abs(np.asarray(x2, np.float64)) @ np.abs(w64).T

  def row_bound(k_shards):
    """|out - ref| bound for row parallel: each shard's partial is rounded to bf16 once
    (u |p_s|), the result once more (u |sum|); float32 accumulation adds ~2^-20 |x||W|."""
    parts = sum(np.abs(np.asarray(x2[:, s], np.float64) @ w64[:, s].T)
                for s in np.split(np.arange(K), k_shards))
    return BF16_U * (parts + np.abs(ref64)) * (1 + BF16_U) + 2.0**-20 * abs_terms + 1e-30

  results = {}
  for shape in MESHES:
    mesh = jax.make_mesh(shape, ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    for lname, lw in layouts.items():
      for scheme in SCHEMES:
        n_axis, k_axis, x_spec = _scheme(scheme, mesh)
        sw = pdense.shard_weight(lw, mesh, n_axis=n_axis, k_axis=k_axis)
        sb = jax.device_put(bias, NamedSharding(mesh, P(n_axis)))
        x = x3 if scheme == "lead_dims" else x2
        sx = jax.device_put(x, NamedSharding(mesh, x_spec))
        f = jax.jit(nf.nvfp4_matmul)
        out = f(sx, sw, sb)
        hlo = f.lower(sx, sw, sb).compile().as_text()
        got = np.asarray(out, np.float32).reshape(M, N)
        k_shards = pdense._size(mesh, pdense._axes(k_axis or (x_spec[1] if len(x_spec) > 1
                                                                else None)))
        ref_single = single[lname]
        ulp = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(ref_single), 2.0**-126))) - 7)
        results[f"{shape}/{lname}/{scheme}"] = dict(
            bitwise=bool(np.array_equal(got, ref_single)),
            max_ulps=float(np.max(np.abs(got - ref_single) / ulp)),
            err_over_bound=float(np.max(np.abs(got - ref64) / row_bound(k_shards))),
            single_err_over_bound=float(np.max(np.abs(single[lname] - ref64) / row_bound(1))),
            out_spec=str(out.sharding.spec), collectives=_multidevice.collective_counts(hlo),
            weight_gathered=sorted(set(_multidevice.gathered_shapes(hlo)) & weight_shapes))

  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
  put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
  # N, K off the kernel's tile/chunk grid (prepared: padded tiles; the rule cannot tie the
  # weight's tiles to x/out): replicated weight, tokens split, x also split on K.
  wu = _random_weight(rng, 100, 96)
  for lname, lw in {"checkpoint": wu, "prepared": nf.prepare(wu)}.items():
    for xspec in (P("data"), P("data", "model")):
      xu = jnp.asarray(rng.standard_normal((M, 96)), jnp.bfloat16)
      f = jax.jit(nf.nvfp4_matmul)
      got = np.asarray(f(put(xu, xspec), lw), np.float32)
      want = np.asarray(xu, np.float64) @ npref.dequantize(
          np.asarray(wu.packed), np.asarray(wu.scales), np.asarray(wu.global_scale)).T
      hlo = f.lower(put(xu, xspec), lw).compile().as_text()
      results[f"unaligned/{lname}/{xspec}"] = dict(
          rel_l2=float(np.linalg.norm(got - want) / np.linalg.norm(want)),
          collectives=_multidevice.collective_counts(hlo))
  f = jax.jit(nf.nvfp4_matmul)
  errors = {}
  # Prepared N = 120 on 4 devices: 30 rows a shard, not whole 16-row tiles (qweight's 8 tiles
  # do split evenly, so only our rule can object).
  w120 = nf.prepare(_random_weight(rng, 120, 128))
  bad = nf.PreparedNVFP4Weight(put(w120.qweight, P("model")), put(w120.qscales, P("model")),
                               w120.global_scale, n=120, k=128)
  errors["prepared_n"] = _error_text(lambda: f(jnp.ones((4, 128), jnp.bfloat16), bad))
  # The same weight in an eager call: checked before any compilation, a plain ValueError.
  errors["prepared_n_eager"] = _error_text(lambda: nf.nvfp4_matmul(jnp.ones((4, 128),
                                                                            jnp.bfloat16), bad))
  # Checkpoint K = 48 with packed split on 2 devices (12 bytes = 24 columns a shard).
  w48 = _random_weight(rng, 64, 48)
  bad = nf.NVFP4Weight(put(w48.packed, P(None, "data")), w48.scales, w48.global_scale)
  errors["checkpoint_k"] = _error_text(lambda: f(jnp.ones((4, 48), jnp.bfloat16), bad))

  # Control: with the gemm as an opaque custom call, the op without our rules all-gathers the
  # weight; with them it does not, and the call sees one shard. Compile only: a host callback
  # inside a partitioned body is not registered with the executable, so it cannot run.
  _install_opaque_gemm()
  control = {}
  prepared = layouts["prepared"]
  # On one device the stand-in runs (and checks the NumPy decoding of the kernel layout).
  fresh = jax.jit(lambda x, w, b: nf.nvfp4_matmul(x, w, b))  # not cached before the override
  control["single_device_callbacks"] = fresh.lower(x2, prepared, bias).compile().as_text().count(
      "_cpu_callback")
  opaque = np.asarray(fresh(x2, prepared, bias), np.float32)
  control["single_device_max_ulps"] = float(np.max(np.abs(opaque - single["prepared"]) / (
      2.0 ** (np.floor(np.log2(np.maximum(np.abs(single["prepared"]), 2.0**-126))) - 7))))
  for scheme, (n_axis, k_axis) in {"column": ("model", None), "row": (None, "model")}.items():
    sw = pdense.shard_weight(prepared, mesh, n_axis=n_axis, k_axis=k_axis)
    sb = put(bias, P(n_axis))

    def unpartitioned(x, w, b):
      with pdense._single_device_body():
        return nf.nvfp4_matmul(x, w, b)

    for label, fn in (("without_rules", unpartitioned), ("with_rules", nf.nvfp4_matmul)):
      hlo = jax.jit(fn).lower(x2, sw, sb).compile().as_text()
      calls = [l for l in hlo.splitlines() if "_cpu_callback" in l and "custom-call(" in l]
      control[f"{scheme}/{label}"] = dict(
          collectives=_multidevice.collective_counts(hlo),
          weight_gathered=sorted(set(_multidevice.gathered_shapes(hlo)) & weight_shapes),
          callback_qweight_shapes=sorted({m for l in calls
                                          for m in re.findall(r"u32\[[\d,]+\]", l)}))
  return dict(results=results, errors=errors, control=control)


# ----------------------------------------------------------------------------- the tests

@pytest.fixture(scope="module", params=[True, False], ids=["shardy", "gspmd"])
def multidevice(request):
  return _multidevice.run_worker("tests.test_sharding_dense", "worker", request.param)


def _cases(results):
  for key, r in results.items():
    if key.startswith("unaligned/"):
      continue
    shape, layout, scheme = key.split("/")
    yield key, scheme, r


def test_every_case_ran(multidevice):
  assert len(multidevice["results"]) == len(MESHES) * 2 * len(SCHEMES) + 4


def test_unaligned_weights_with_sharded_tokens(multidevice):
  for key, r in multidevice["results"].items():
    if key.startswith("unaligned/"):
      assert r["rel_l2"] < 4e-3, (key, r)  # one bf16 rounding of the output
      assert r["collectives"]["all-to-all"] == 0, (key, r)


def test_sharded_results_match_single_device(multidevice):
  for key, scheme, r in _cases(multidevice["results"]):
    # The single-device op is within the rounding bound (sanity of the bound itself).
    assert r["single_err_over_bound"] <= 1.0, key
    if scheme in ROW_LIKE:
      # Partial sums over K are rounded to bf16 once per shard before the float32 psum: within
      # the bound derived in row_bound, not bitwise.
      assert r["err_over_bound"] <= 1.0, (key, r)
    else:
      # Every output element is the same float32 K reduction on one device, so the results
      # are the same up to the order XLA's CPU dot accumulates in, which may depend on the
      # operand shapes: at most one bf16 rounding apart (in practice bit-identical here).
      assert r["max_ulps"] <= 1.0, (key, r)


def test_no_weight_all_gather_and_expected_all_reduce(multidevice):
  for key, scheme, r in _cases(multidevice["results"]):
    c = r["collectives"]
    assert r["weight_gathered"] == [], (key, r)
    if scheme == "x_k_sharded":
      continue  # GSPMD gathers x here (the weight stays put); Shardy slices the weight
    assert c["all-gather"] == 0, (key, c)
    assert c["all-to-all"] == 0 and c["collective-permute"] == 0, (key, c)
    mesh = tuple(int(d) for d in key.split("/")[0].strip("()").split(","))
    k_split = {"row": mesh[1], "row8": 8}.get(scheme, 1)
    assert c["all-reduce"] == (1 if k_split > 1 else 0), (key, c)


def test_output_sharding_follows_the_weight(multidevice):
  r = multidevice["results"]
  assert r["(2, 4)/prepared/column"]["out_spec"] == "P('data', 'model')"
  assert r["(2, 4)/checkpoint/row"]["out_spec"] == "P('data',)"
  assert r["(2, 4)/checkpoint/column8"]["out_spec"] == "P(None, ('data', 'model'))"
  assert r["(2, 4)/prepared/lead_dims"]["out_spec"] == "P(None, 'data', 'model')"


def test_control_opaque_custom_call_is_gathered_without_rules(multidevice):
  c = multidevice["control"]
  full, shard = (f"u32[{N // 16},{K // 64},32,4]",
                 {"column": f"u32[{N // 16 // 4},{K // 64},32,4]",
                  "row": f"u32[{N // 16},{K // 64 // 4},32,4]"})
  # The stand-in computes the op (float64 NumPy from the kernel layout): one rounding apart.
  assert c["single_device_callbacks"] >= 1 and c["single_device_max_ulps"] <= 1.0, c
  for scheme in ("column", "row"):
    without, with_ = c[f"{scheme}/without_rules"], c[f"{scheme}/with_rules"]
    # Without rules: the weight is gathered and the opaque call gets all of it.
    assert without["collectives"]["all-gather"] >= 1 and without["weight_gathered"], without
    assert without["callback_qweight_shapes"] == [full], without
    # With them: no gather, the call gets this device's quarter of the weight.
    assert with_["collectives"]["all-gather"] == 0 and with_["weight_gathered"] == [], with_
    assert with_["callback_qweight_shapes"] == [shard[scheme]], with_
    assert with_["collectives"]["all-reduce"] == (1 if scheme == "row" else 0), with_


def test_bad_sharding_raises_clear_error(multidevice):
  e = multidevice["errors"]
  # XLA's partitioner calls back into Python and re-raises our ValueError inside its own error.
  assert "ValueError: nvfp4_matmul sharding" in e["prepared_n"], e
  assert "N dim (size 120)" in e["prepared_n"] and "'model' of size 4" in e["prepared_n"]
  assert "multiple of 16 rows" in e["prepared_n"]
  assert e["prepared_n_eager"].startswith("ValueError: nvfp4_matmul sharding"), e
  assert "N dim (size 120)" in e["prepared_n_eager"]
  assert "K dim (size 48)" in e["checkpoint_k"] and "'data' of size 2" in e["checkpoint_k"]
  assert "multiple of 16 columns" in e["checkpoint_k"]


# ----------------------------------------------------------------------------- one device

@pytest.mark.parametrize("n, k, n_shards, k_shards", [(128, 512, 4, 2), (64, 256, 2, 4),
                                                       (96, 192, 3, 3)])
def test_shard_of_prepared_weight_is_prepared_shard(rng, n, k, n_shards, k_shards):
  w = _random_weight(rng, n, k)
  p = nf.prepare(w)
  nt, kc = n // 16 // n_shards, k // 64 // k_shards
  for i in range(n_shards):
    for j in range(k_shards):
      rows, cols = slice(i * n // n_shards, (i + 1) * n // n_shards), slice(
          j * k // k_shards, (j + 1) * k // k_shards)
      shard = nf.NVFP4Weight(w.packed[rows, cols.start // 2:cols.stop // 2],
                             w.scales[rows, cols.start // 16:cols.stop // 16], w.global_scale)
      want = nf.prepare(shard)
      tiles, chunks = slice(i * nt, (i + 1) * nt), slice(j * kc, (j + 1) * kc)
      np.testing.assert_array_equal(np.asarray(p.qweight[tiles, chunks]), np.asarray(want.qweight))
      np.testing.assert_array_equal(np.asarray(p.qscales[tiles, chunks]), np.asarray(want.qscales))


def test_weight_shardings_rejects_unaligned_splits(rng):
  from jax.sharding import AbstractMesh, PartitionSpec as P
  mesh = AbstractMesh((2, 4), ("data", "model"))
  p = nf.prepare(_random_weight(rng, 64, 128))
  with pytest.raises(ValueError, match=r"N dim \(size 64\).*\('data', 'model'\) of size 8.*"
                                       r"multiple of 16 rows"):
    pdense.weight_shardings(p, mesh, n_axis=("data", "model"))
  with pytest.raises(ValueError, match=r"K dim \(size 128\).*'model' of size 4.*multiple of 64"):
    pdense.weight_shardings(p, mesh, k_axis="model")
  w = _random_weight(rng, 100, 96)
  with pytest.raises(ValueError, match=r"N dim \(size 100\).*of size 8.*whole number"):
    pdense.weight_shardings(w, mesh, n_axis=("data", "model"))
  with pytest.raises(ValueError, match=r"K dim \(size 96\).*'model' of size 4.*multiple of 16"):
    pdense.weight_shardings(w, mesh, k_axis="model")
  with pytest.raises(ValueError, match="single"):
    pdense.weight_shardings(nf.quantize(jnp.ones((2, 16, 32))), mesh)
  with pytest.raises(ValueError, match="not an axis of the mesh"):
    pdense.weight_shardings(w, mesh, n_axis="expert")
  with pytest.raises(ValueError, match="cannot share"):
    pdense.weight_shardings(w, mesh, n_axis="data", k_axis="data")
  s = pdense.weight_shardings(_random_weight(rng, 100, 128), mesh, n_axis="data", k_axis="model")
  assert s.packed.spec == P("data", "model") and s.global_scale.spec == P()


def test_single_device_skips_the_partitioned_op(rng):
  # This process has one device: nvfp4_matmul calls the op directly (the 8-device workers
  # above cover the partitioned path), and the partitioned op equals it on one device.
  assert jax.device_count() == 1
  w = _random_weight(rng, 32, 64)
  x = jnp.asarray(rng.standard_normal((3, 64)), jnp.bfloat16)
  assert "custom_partitioning" not in str(jax.make_jaxpr(nf.nvfp4_matmul)(x, w))
  from jax_nvfp4.parallel import dense as parallel_dense
  assert "custom_partitioning" in str(jax.make_jaxpr(parallel_dense.partitioned_matmul)(x, w, None))
  np.testing.assert_array_equal(np.asarray(jax.jit(nf.nvfp4_matmul)(x, w)),
                                np.asarray(jax.jit(parallel_dense.partitioned_matmul)(x, w, None)))
