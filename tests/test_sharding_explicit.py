"""NVFP4 weights sharded over a mesh with Explicit axes (``jax.make_mesh``'s default axis type),
on 8 fake CPU devices.

Under Explicit axes an array's sharding is part of its type, and jnp ops that cannot infer a
result's sharding raise. Checked here, against float64 NumPy references: ``nvfp4_matmul`` called
eagerly and under jit, ``prepare`` / ``unprepare`` of sharded weights (exact), and the gradient
of ``NVFP4Linear`` (its custom VJP must return cotangents sharded exactly like its inputs).
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

from tests import _multidevice
from tests import numpy_reference as npref

N, K = 64, 256
LAYOUTS = ("checkpoint", "prepared")
SPLITS = {"n": ("model", None), "k": (None, "model"), "none": (None, None)}  # weight [N, K]
X_SPECS = {"replicated": (), "tokens": ("data",), "k": (None, "model")}       # x [M, K]
TOL = 5e-3                     # rel-L2 of a bf16 result vs float64 (the dense op's bar)


def _random_weight(rng):
  import jax.numpy as jnp
  import jax_nvfp4 as nf
  packed = rng.integers(0, 256, size=(N, K // 2), dtype=np.uint8)
  scales = rng.uniform(2.0**-6, 8.0, size=(N, K // 16)).astype(jnp.float8_e4m3fn)
  return nf.NVFP4Weight(jnp.asarray(packed), jnp.asarray(scales), jnp.float32(0.03))


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _padded(spec) -> list:
  """A 3-D array's PartitionSpec as a list of 3 entries (trailing None entries are implicit)."""
  return [str(e) for e in (*spec, None, None, None)[:3]]


def _attempt(fn):
  """``fn()``'s result, or the error text."""
  try:
    return fn()
  except Exception as e:  # noqa: BLE001
    return f"{type(e).__name__}: {str(e)[:400]}"


def worker():
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

  import jax_nvfp4 as nf
  from jax_nvfp4 import parallel
  from jax_nvfp4.nn import NVFP4Linear

  assert len(jax.devices()) == 8
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
  rng = np.random.default_rng(7)
  w = _random_weight(rng)
  w64 = npref.dequantize(np.asarray(w.packed), np.asarray(w.scales), float(w.global_scale))
  layouts = {"checkpoint": w, "prepared": nf.prepare(w)}
  x = jnp.asarray(rng.standard_normal((8, K)), jnp.bfloat16)
  want = np.asarray(x, np.float64) @ w64.T
  results = {"op": {}, "layout": {}, "grad": {}}

  # nvfp4_matmul, eager and jitted, with and without the mesh in context: the float64 error of
  # each, and whether the eager result has the bits of the jitted one (the partitioned op).
  for layout, ww in layouts.items():
    for split, (n_axis, k_axis) in SPLITS.items():
      ws = parallel.shard_weight(ww, mesh, n_axis=n_axis, k_axis=k_axis)
      for x_spec, spec in X_SPECS.items():
        xs = jax.device_put(x, NamedSharding(mesh, P(*spec)))
        for ctx in ("mesh", "no_mesh"):
          def call(ws=ws, xs=xs, ctx=ctx):
            with jax.set_mesh(mesh) if ctx == "mesh" else contextlib.nullcontext():
              eager = np.asarray(nf.nvfp4_matmul(xs, ws))
              jitted = np.asarray(jax.jit(nf.nvfp4_matmul)(xs, ws))
            return dict(eager=_rel(eager, want), jit=_rel(jitted, want),
                        same_bits=bool(np.array_equal(eager, jitted)))
          results["op"][f"{layout}/{split}/{x_spec}/{ctx}"] = _attempt(call)

  # prepare / unprepare of sharded weights: the same bits as unsharded.
  prepared, back = layouts["prepared"], nf.unprepare(layouts["prepared"])
  for split, (n_axis, k_axis) in SPLITS.items():
    for how in ("eager", "jit"):
      wrap = (lambda g: g) if how == "eager" else jax.jit
      def same(fn, arg, ref):
        with jax.set_mesh(mesh):
          got = wrap(fn)(arg)
        # The tree structure holds the static fields (n, k, gate_up_pairs) and the leaf count.
        if jax.tree.structure(got) != jax.tree.structure(ref):
          return False
        pairs = zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True)
        return all(a.shape == b.shape and np.asarray(a).tobytes() == np.asarray(b).tobytes()
                   for a, b in pairs)
      ws = parallel.shard_weight(w, mesh, n_axis=n_axis, k_axis=k_axis)
      results["layout"][f"prepare/{split}/{how}"] = _attempt(lambda: same(nf.prepare, ws,
                                                                          prepared))
      wp = parallel.shard_weight(prepared, mesh, n_axis=n_axis, k_axis=k_axis)
      results["layout"][f"unprepare/{split}/{how}"] = _attempt(lambda: same(nf.unprepare, wp,
                                                                            back))

  # d/dx and d/dbias of sum(layer(x) * c) under jit: c @ W and sum(c) (c rounded to bf16, the
  # cotangent of the layer's bf16 product), with dx laid out like x.
  xg = rng.standard_normal((2, 4, K)).astype(np.float32)
  c = rng.standard_normal((2, 4, N)).astype(np.float32)
  c16 = np.asarray(jnp.asarray(c, jnp.bfloat16), np.float64)
  want_dx = c16 @ w64
  want_db = c16.reshape(-1, N).sum(0)
  with jax.set_mesh(mesh):
    for layout in LAYOUTS:
      for split in ("n", "k", "none"):
        for x_spec in ("replicated", "data"):
          def grads(layout=layout, split=split, x_spec=x_spec):
            ks = None if split == "none" else SPLITS[split]
            layer = NVFP4Linear.from_nvfp4(layouts[layout], jnp.zeros((N,), jnp.float32),
                                           prepare=layout == "prepared", kernel_sharding=ks)
            xs = jax.device_put(jnp.asarray(xg), NamedSharding(
                mesh, P("data") if x_spec == "data" else P()))

            @nnx.jit
            def step(layer, x):
              loss = lambda layer, x: jnp.sum(layer(x) * c)
              return nnx.grad(loss, argnums=(0, 1))(layer, x)

            g_layer, dx = step(layer, xs)
            return dict(dx=_rel(dx, want_dx), dbias=_rel(g_layer["bias"].get_value(), want_db),
                        dx_spec=_padded(dx.sharding.spec), x_spec=_padded(xs.sharding.spec))
          results["grad"][f"{layout}/{split}/{x_spec}"] = _attempt(grads)
  return results


# ----------------------------------------------------------------------------- the tests

@pytest.fixture(scope="module")
def library():
  return _multidevice.run_worker("tests.test_sharding_explicit", "worker", timeout=600)


@pytest.mark.parametrize("ctx", ["mesh", "no_mesh"])
@pytest.mark.parametrize("x_spec", list(X_SPECS))
@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_matmul_with_explicit_sharded_weight(library, layout, split, x_spec, ctx):
  """Eager calls are the partitioned op too: the jitted result's bits (a row-parallel product
  run op by op would round differently, or refuse an x sharded on K)."""
  r = library["op"][f"{layout}/{split}/{x_spec}/{ctx}"]
  assert isinstance(r, dict), r
  assert r["jit"] <= TOL and r["same_bits"], r


LAYOUT_CASES = [(f, s, h) for f in ("prepare", "unprepare") for s in SPLITS
                for h in ("eager", "jit")]


@pytest.mark.parametrize("fn, split, how", LAYOUT_CASES)
def test_layout_conversion_of_explicit_sharded_weight_is_exact(library, fn, split, how):
  assert library["layout"][f"{fn}/{split}/{how}"] is True, library["layout"]


@pytest.mark.parametrize("x_spec", ["replicated", "data"])
@pytest.mark.parametrize("split", ["n", "k", "none"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_linear_grad_under_explicit_mesh(library, layout, split, x_spec):
  r = library["grad"][f"{layout}/{split}/{x_spec}"]
  assert isinstance(r, dict), r
  assert r["dx"] <= 1e-2 and r["dbias"] <= 1e-6, r
  assert r["dx_spec"] == r["x_spec"], r
