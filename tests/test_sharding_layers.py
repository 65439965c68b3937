"""Sharding metadata of the Flax layers (NNX NVFP4Linear / NVFP4MoE, Linen NVFP4Dense /
NVFP4MoE): created directly sharded on 8 fake CPU devices, checked against one device.

The multi-device cases run in one child process (tests/_multidevice.py) and return what they saw
(the PartitionSpec of every array, numbers); the tests below assert on them. Error messages that
only need an abstract mesh run here.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import jax_nvfp4 as nf
from jax_nvfp4.nn import NVFP4Linear, NVFP4MoE
from jax_nvfp4.nn import linen as L
from tests import _multidevice
from tests import numpy_moe_reference as ref

E, H, I, TOP_K, M = 8, 64, 256, 2, 12  # I/4 = 64: whole k64 chunks of w2 on 4 tensor shards
MESH = (2, 4)                           # ("expert", "model")
TOL = 5e-3                              # rel-L2 vs float64 (tests/test_moe.py's bf16 bound)
# A sharded MoE rounds each device's partial to bf16 before the sum (parallel/moe.py): a few
# bf16 roundings of the partials, relative to the output. One device vs sharded, rel-L2.
SHARDED_REL = 6e-3
# A w13 bias left in [gate; up] order under a tensor split of 4 gives each shard other rows'
# biases: measured 0.15 to 0.16 rel-L2 (biases of std 0.1 here), 30x the layers' TOL.
BIAS_ORDER_REL = 0.05

EXPECTED_NNX_MOE = {  # parallel.moe_state_specs with expert_axis="expert", tensor_axis="model"
    "checkpoint": {
        "router": "P()", "w13_bias": "P('expert', 'model')",
        "w13_packed": "P('expert', 'model')", "w13_scales": "P('expert', 'model')",
        "w13_global_scale": "P('expert',)", "w2_bias": "P('expert',)",
        "w2_packed": "P('expert', None, 'model')", "w2_scales": "P('expert', None, 'model')",
        "w2_global_scale": "P('expert',)"},
    "prepared": {
        "router": "P()", "w13_bias": "P('expert', 'model')",
        "w13_qweight": "P('expert', 'model')",
        "w13_qscales": "P('expert', 'model')", "w13_global_scale": "P('expert',)",
        "w2_bias": "P('expert',)", "w2_qweight": "P('expert', None, 'model')",
        "w2_qscales": "P('expert', None, 'model')", "w2_global_scale": "P('expert',)"},
}


#: The NNX / Linen MoE layouts the worker builds sharded: the checkpoint layout, the kernel
#: layout with w13 in [gate; up] (per-shard) order, and the kernel layout's default, w13 in
#: gate_up_pairs order.
LAYOUTS = {"checkpoint": dict(prepare=False),
           "prepared": dict(prepare=True, fuse_activation=False),
           "pairs": dict(prepare=True)}
EXPECTED_NNX_MOE["pairs"] = {**EXPECTED_NNX_MOE["prepared"], "w13_gate_up_pairs": "P()"}
# gate_up_pairs layers on more meshes (NNX and Linen; both axes with swiglu: the layouts above):
# name -> (mesh shape, mesh axes, expert_axis, tensor_axis, activation keywords).
PAIRS_CASES = {
    "expert": ((8,), ("expert",), "expert", None, {}),
    "tensor": (MESH, ("expert", "model"), None, "model", {}),
    "both_gptoss": (MESH, ("expert", "model"), "expert", "model",
                    dict(activation="gptoss", limit=1.0)),
}


def _per_shard_rows(a, tp: int) -> np.ndarray:
  """Rows (last dim) [gate; up] of ``a`` as [gate_0; up_0; ...; gate_{tp-1}; up_{tp-1}] (NumPy,
  independent of jax_nvfp4.parallel)."""
  a = np.asarray(a)
  i = a.shape[-1] // 2
  step = i // tp
  return np.concatenate([a[..., start:start + step] for t in range(tp)
                         for start in (t * step, i + t * step)], axis=-1)


def _without_pairs_record(variables):
  """Linen variables (or their shardings) without the w13 gate_up_pairs record."""
  return {**variables, "nvfp4": {k: v for k, v in variables["nvfp4"].items()
                                 if k != "w13_gate_up_pairs"}}


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _spec(sharding) -> str:
  """str of a NamedSharding's PartitionSpec without trailing Nones (jax keeps or drops them
  depending on how the array was made), or the sharding's type name."""
  if not isinstance(sharding, jax.sharding.NamedSharding):
    return type(sharding).__name__
  entries = list(sharding.spec)
  while entries and entries[-1] is None:
    entries.pop()
  return str(jax.sharding.PartitionSpec(*entries))


def _specs(tree) -> dict[str, str]:
  """'path/to/leaf' -> str(PartitionSpec) of every concrete array (NamedSharding only)."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    key = "/".join(str(getattr(p, "key", getattr(p, "name", p))) for p in path)
    key = key.replace("/value", "")
    out[key] = _spec(getattr(leaf, "sharding", None))
  return out


# ----------------------------------------------------------------------------- the worker

def worker():
  from jax.sharding import AxisType, NamedSharding
  assert len(jax.devices()) == 8
  rng = np.random.default_rng(7)
  mesh = jax.make_mesh(MESH, ("expert", "model"), axis_types=(AxisType.Auto,) * 2)
  x = jnp.asarray(rng.standard_normal((M, H)), jnp.bfloat16)
  router = rng.standard_normal((E, H)).astype(np.float32) * 0.3
  w13f = rng.standard_normal((E, 2 * I, H)).astype(np.float32) * 0.15
  w2f = rng.standard_normal((E, H, I)).astype(np.float32) * 0.1
  b13 = rng.standard_normal((E, 2 * I)).astype(np.float32) * 0.1
  b2 = rng.standard_normal((E, H)).astype(np.float32) * 0.1
  w13, w2 = nf.quantize(jnp.asarray(w13f)), nf.quantize(jnp.asarray(w2f))
  call = lambda m, v: m(v)
  res = {}

  # float64 oracle of the layer on the dequantized experts (the router runs in bf16).
  x64 = np.asarray(x, np.float64)
  r64 = np.asarray(jnp.asarray(router, jnp.bfloat16), np.float64)
  tw, ti = ref.route(x64 @ r64.T, TOP_K)
  dq13, dq2 = ref.dequantize_experts(w13), ref.dequantize_experts(w2)
  want = ref.moe(x64, dq13, dq2, tw, ti, b13=b13, b2=b2)

  def pairs_case(mesh, expert_axis, tensor_axis, act):
    """NNX and Linen layers in gate_up_pairs order on ``mesh`` against the unsharded pairs
    layer and the float64 layer, with negative controls: the pairs rows read as [gate; up]
    ones, and (with a tensor split) the w13 bias left in [gate; up] order."""
    tp = 1 if tensor_axis is None else mesh.shape[tensor_axis]
    kw = dict(top_k=TOP_K, w13_bias=b13, w2_bias=b2, prepare=True, **act)
    axes = dict(expert_axis=expert_axis, tensor_axis=tensor_axis)
    want_act = ref.moe(x64, dq13, dq2, tw, ti, b13=b13, b2=b2,
                       activation_kind=act.get("activation", "swiglu"), limit=act.get("limit"))
    y_one = np.asarray(nnx.jit(call)(NVFP4MoE.from_nvfp4(router, w13, w2, **kw), x), np.float64)
    lin = L.NVFP4MoE(I, E, top_k=TOP_K, use_expert_bias=True, prepare=True, **axes, **act)
    loaded = L.moe_variables(router, w13, w2, w13_bias=b13, w2_bias=b2, prepare=True,
                             gate_up_pairs=True, gate_up_shards=tp)
    with jax.set_mesh(mesh):
      layer = NVFP4MoE.from_nvfp4(router, w13, w2, **axes, **kw)
      graphdef, state = nnx.split(layer)
      f = jax.jit(lambda st, v: nnx.merge(graphdef, st)(v))
      y = np.asarray(f(state, x), np.float64)
      hlo = f.lower(state, x).compile().as_text()
      misread = nnx.merge(graphdef, state)  # the same arrays, taken for [gate; up] rows
      misread.gate_up_pairs, misread.w13_gate_up_pairs = False, nnx.data(None)
      y_misread = np.asarray(nnx.jit(call)(misread, x), np.float64)
      y_bias_unordered = None
      if tp > 1:
        unordered = nnx.merge(graphdef, state)
        unordered.w13_bias.set_value(jax.device_put(jnp.asarray(b13),
                                                    unordered.w13_bias.get_value().sharding))
        y_bias_unordered = np.asarray(nnx.jit(call)(unordered, x), np.float64)
      abstract = jax.eval_shape(lin.init, jax.random.key(0), x)
      placed = jax.device_put(loaded, nn.unbox(nn.get_sharding(abstract, mesh)))
      y_lin = np.asarray(jax.jit(lin.apply)(placed, x), np.float64)
    return dict(
        gate_up_pairs=layer.gate_up_pairs, gate_up_shards=layer.gate_up_shards,
        linen_records={k: list(v.shape) for k, v in nn.unbox(abstract)["nvfp4"].items()
                       if k.startswith("w13_gate_up")},
        one_rel=_rel(y_one, want_act), rel=_rel(y, want_act), vs_one=_rel(y, y_one),
        bitwise_vs_one=bool(np.array_equal(y, y_one)),
        collectives=_multidevice.collective_counts(hlo),
        linen_vs_nnx_bitwise=bool(np.array_equal(y_lin, y)),
        misread_rel=_rel(y_misread, want_act),
        bias_unordered_rel=None if y_bias_unordered is None else _rel(y_bias_unordered,
                                                                      want_act))

  # --- NNX NVFP4MoE, expert x tensor parallel, every layout, created eagerly and abstractly.
  single = NVFP4MoE.from_nvfp4(router, w13, w2, top_k=TOP_K, w13_bias=b13, w2_bias=b2)
  y_single = np.asarray(nnx.jit(call)(single, x), np.float64)
  res["nnx_single_rel"] = _rel(y_single, want)
  # The unsharded layer in gate_up_pairs order (its own roundings: GEMM 1 fuses the activation).
  single_pairs = NVFP4MoE.from_nvfp4(router, w13, w2, top_k=TOP_K, w13_bias=b13, w2_bias=b2,
                                     prepare=True)
  assert single_pairs.gate_up_pairs
  y_single_pairs = np.asarray(nnx.jit(call)(single_pairs, x), np.float64)
  res["nnx_single_pairs_rel"] = _rel(y_single_pairs, want)
  nnx_sharded = {}
  for layout, layout_kw in LAYOUTS.items():
    create = lambda: NVFP4MoE.from_nvfp4(router, w13, w2, top_k=TOP_K, w13_bias=b13,
                                         w2_bias=b2, expert_axis="expert", tensor_axis="model",
                                         **layout_kw)
    one = single_pairs if layout == "pairs" else single
    y_one = y_single_pairs if layout == "pairs" else y_single
    with jax.set_mesh(mesh):
      eager = create()
      abstract = nnx.eval_shape(create)
      pspecs = nnx.get_partition_spec(nnx.state(abstract))
      shardings = jax.tree.map(lambda p: NamedSharding(mesh, p), pspecs)
      state = jax.jit(lambda: nnx.state(create()), out_shardings=shardings)()
      layer = nnx.merge(nnx.graphdef(abstract), state)
      f = jax.jit(lambda st, v: nnx.merge(nnx.graphdef(abstract), st)(v))
      y = np.asarray(f(state, x), np.float64)
      hlo = f.lower(state, x).compile().as_text()
      y_eager = np.asarray(eager(x), np.float64)
    nnx_sharded[layout] = y
    canonical = eager.w13 if layout == "checkpoint" else nf.unprepare(eager.w13)
    res[f"nnx_moe/{layout}"] = dict(
        eager_specs={k: _spec(v.get_value().sharding) for k, v in nnx.state(eager).items()},
        jit_specs={k: _spec(v.get_value().sharding) for k, v in nnx.state(layer).items()},
        gate_up_shards=eager.gate_up_shards,
        gate_up_pairs=[eager.gate_up_pairs, layer.gate_up_pairs,
                       bool(getattr(layer._weight("w13"), "gate_up_pairs", False))],
        sharded_vs_single=_rel(y, y_one), eager_vs_single=_rel(y_eager, y_one),
        rel=_rel(y, want), collectives=_multidevice.collective_counts(hlo),
        # Outside the mesh the layer runs fused_moe on the whole weights: one device's numbers.
        no_mesh_bitwise=bool(np.array_equal(np.asarray(eager(x), np.float64), y_one)),
        w13_canonical=all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
                          zip(jax.tree.leaves(canonical), jax.tree.leaves(single.w13))),
        # The stored rows: those of the unsharded layer of that order (pairs: not reordered).
        w13_rows_unsharded=all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
                               zip(jax.tree.leaves(eager._weight("w13")),
                                   jax.tree.leaves(one._weight("w13")))),
        w13_bias_per_shard=bool(np.array_equal(np.asarray(eager.w13_bias.get_value()),
                                               _per_shard_rows(b13, MESH[1]))))
  # Pure expert parallel over all 8 devices: bitwise (parallel/moe.py's property).
  with jax.set_mesh(jax.make_mesh((8,), ("expert",), axis_types=(AxisType.Auto,))):
    ep = NVFP4MoE.from_nvfp4(router, w13, w2, top_k=TOP_K, w13_bias=b13, w2_bias=b2,
                             expert_axis="expert")
    y_ep = np.asarray(nnx.jit(call)(ep, x), np.float64)
    res["nnx_moe_ep8"] = dict(bitwise=bool(np.array_equal(y_ep, y_single)),
                              spec=_spec(ep.w2_packed.get_value().sharding),
                              gate_up_shards=ep.gate_up_shards)
  # relu2 (non-gated): w13 split on its I rows, no reordering.
  relu13 = nf.quantize(jnp.asarray(w13f[:, :I]))
  relu_single = nnx.jit(call)(NVFP4MoE.from_nvfp4(router, relu13, w2, top_k=TOP_K,
                                                  activation="relu2"), x)
  with jax.set_mesh(mesh):
    relu = NVFP4MoE.from_nvfp4(router, relu13, w2, top_k=TOP_K, activation="relu2",
                               expert_axis="expert", tensor_axis="model")
    res["nnx_moe_relu2"] = dict(rel=_rel(nnx.jit(call)(relu, x), relu_single),
                                gate_up_shards=relu.gate_up_shards,
                                spec=_spec(relu.w13_packed.get_value().sharding))
  # The mesh's tensor axis must be the one w13 was reordered for.
  with jax.set_mesh(jax.make_mesh((4, 2), ("expert", "model"), axis_types=(AxisType.Auto,) * 2)):
    try:
      eager(x)
      res["nnx_moe_other_mesh"] = "no error"
    except ValueError as e:
      res["nnx_moe_other_mesh"] = str(e)

  # --- NNX NVFP4Linear from an already-quantized weight made before the mesh (eager creation).
  wd = nf.quantize(jnp.asarray(rng.standard_normal((128, 256)), jnp.float32))
  bias = rng.standard_normal(128).astype(np.float32)
  lin_single = NVFP4Linear.from_nvfp4(wd, bias)
  with jax.set_mesh(mesh):
    lin = NVFP4Linear.from_nvfp4(wd, bias, kernel_sharding=("model", "expert"))
    y = nnx.jit(call)(lin, x.repeat(4, axis=1))
  res["nnx_linear"] = dict(packed=_spec(lin.packed.get_value().sharding),
                           bias=_spec(lin.bias.get_value().sharding),
                           rel=_rel(y, lin_single(x.repeat(4, axis=1))))

  # --- Linen NVFP4Dense: init directly sharded (eval_shape -> specs -> jit out_shardings).
  xd = jnp.asarray(rng.standard_normal((M, 256)), jnp.bfloat16)
  for layout in ("checkpoint", "prepared"):
    prep = layout == "prepared"
    layer = L.NVFP4Dense(128, prepare=prep, kernel_sharding=("model", None))
    with jax.set_mesh(mesh):
      abstract = jax.eval_shape(layer.init, jax.random.key(0), xd)
      shardings = nn.get_sharding(abstract, mesh)
      variables = jax.jit(layer.init, out_shardings=shardings)(jax.random.key(0), xd)
      y = jax.jit(layer.apply)(variables, xd)
    plain = L.NVFP4Dense(128, prepare=prep).init(jax.random.key(0), xd)
    res[f"linen_dense/{layout}"] = dict(
        specs=_specs(variables), boxed=type(variables["nvfp4"]["qweight" if prep else
                                                            "packed"]).__name__,
        rel=_rel(y, L.NVFP4Dense(128, prepare=prep).apply(plain, xd)),
        same_values=all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
                        zip(jax.tree.leaves(nn.unbox(variables)), jax.tree.leaves(plain))))

  # --- Linen NVFP4MoE: init sharded; loading checkpoint tensors directly sharded.
  linen_loaded = {}
  for layout, layout_kw in LAYOUTS.items():
    prep, pairs = layout_kw["prepare"], layout == "pairs"
    layer = L.NVFP4MoE(I, E, top_k=TOP_K, use_expert_bias=True, expert_axis="expert",
                       tensor_axis="model", **layout_kw)
    plain = L.NVFP4MoE(I, E, top_k=TOP_K, use_expert_bias=True, **layout_kw)
    loaded = L.moe_variables(router, w13, w2, w13_bias=b13, w2_bias=b2, prepare=prep,
                             gate_up_shards=MESH[1], gate_up_pairs=pairs)
    with jax.set_mesh(mesh):
      abstract = jax.eval_shape(layer.init, jax.random.key(0), x)
      shardings = nn.get_sharding(abstract, mesh)
      variables = jax.jit(layer.init, out_shardings=shardings)(jax.random.key(0), x)
      # A loader puts each tensor where the layer's metadata says (unboxed variables apply too).
      placed = jax.device_put(loaded, nn.unbox(shardings))
      y_init = np.asarray(jax.jit(layer.apply)(variables, x), np.float64)
      y_loaded = np.asarray(jax.jit(layer.apply)(placed, x), np.float64)
      if pairs:
        # State without the pairs record (as written before it existed) is [gate; up], also
        # under a layer whose init would store pairs; losing the record of pairs state makes
        # the layer read pairs rows as [gate; up] ones (the negative control).
        old_state = L.moe_variables(router, w13, w2, w13_bias=b13, w2_bias=b2, prepare=True,
                                    gate_up_shards=MESH[1])
        y_old = np.asarray(jax.jit(layer.apply)(jax.device_put(
            old_state, _without_pairs_record(nn.unbox(shardings))), x), np.float64)
        y_lost = np.asarray(jax.jit(layer.apply)(_without_pairs_record(placed), x), np.float64)
    # The same variables without a mesh: fused_moe on the rows put back in [gate; up] order.
    y_init_1 = np.asarray(jax.jit(layer.apply)(nn.unbox(variables), x), np.float64)
    y_plain = np.asarray(jax.jit(plain.apply)(L.moe_variables(
        router, w13, w2, w13_bias=b13, w2_bias=b2, prepare=prep, gate_up_pairs=pairs), x),
        np.float64)
    res[f"linen_moe/{layout}"] = dict(
        specs=_specs(variables), loaded_specs=_specs(placed),
        records={k: list(nn.unbox(v).shape) for k, v in variables["nvfp4"].items()
                 if k.startswith("w13_gate_up")},
        init_vs_one_device=_rel(y_init, y_init_1), loaded_vs_single=_rel(y_loaded, y_plain),
        loaded_rel=_rel(y_loaded, want),
        plain_vs_nnx=_rel(y_plain, y_single_pairs if pairs else y_single),
        loaded_vs_nnx_sharded=_rel(y_loaded, nnx_sharded[layout]))
    linen_loaded[layout] = y_loaded
    if pairs:
      res["linen_moe/pairs"].update(
          old_state_vs_prepared=bool(np.array_equal(y_old, linen_loaded["prepared"])),
          record_lost_rel=_rel(y_lost, want))

  # --- gate_up_pairs on the other meshes, NNX and Linen.
  for name, (shape, axes, expert_axis, tensor_axis, act) in PAIRS_CASES.items():
    res[f"pairs/{name}"] = pairs_case(
        jax.make_mesh(shape, axes, axis_types=(AxisType.Auto,) * len(axes)), expert_axis,
        tensor_axis, act)

  # --- Bad splits (the mesh in context has the sizes).
  errors = {}
  with jax.set_mesh(mesh):
    cases = {
        "nnx_moe_experts": lambda: NVFP4MoE.from_nvfp4(
            router[:6], jax.tree.map(lambda a: a[:6], w13), jax.tree.map(lambda a: a[:6], w2),
            top_k=TOP_K, expert_axis="model"),
        "nnx_moe_inter": lambda: NVFP4MoE(H, 96, E, top_k=TOP_K, rngs=nnx.Rngs(0),
                                          tensor_axis="model"),
        "nnx_linear_n": lambda: NVFP4Linear(64, 40, rngs=nnx.Rngs(0), prepare=True,
                                            kernel_sharding=("model", None)),
        "nnx_linear_n_ckpt": lambda: NVFP4Linear(64, 42, rngs=nnx.Rngs(0),
                                                 kernel_sharding=("model", None)),
        "nnx_linear_k": lambda: NVFP4Linear(96, 32, rngs=nnx.Rngs(0),
                                            kernel_sharding=(None, "model")),
        "nnx_linear_axis": lambda: NVFP4Linear(64, 32, rngs=nnx.Rngs(0),
                                               kernel_sharding=("tensor", None)),
        "linen_dense_k": lambda: L.NVFP4Dense(32, kernel_sharding=(None, "model")).init(
            jax.random.key(0), jnp.ones((2, 96), jnp.bfloat16)),
        "linen_dense_n": lambda: L.NVFP4Dense(40, prepare=True,
                                              kernel_sharding=("model", None)).init(
            jax.random.key(0), jnp.ones((2, 64), jnp.bfloat16)),
        "linen_moe_inter": lambda: L.NVFP4MoE(96, E, top_k=TOP_K, tensor_axis="model").init(
            jax.random.key(0), x),
    }
    for name, fn in cases.items():
      try:
        fn()
        errors[name] = "no error"
      except Exception as e:  # noqa: BLE001
        errors[name] = f"{type(e).__name__}: {e}"
  res["errors"] = errors
  return res


# ----------------------------------------------------------------------------- the tests

@pytest.fixture(scope="module")
def multidevice():
  return _multidevice.run_worker("tests.test_sharding_layers", "worker", timeout=600)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_nnx_moe_created_sharded(multidevice, layout):
  r = multidevice[f"nnx_moe/{layout}"]
  assert r["eager_specs"] == EXPECTED_NNX_MOE[layout], r["eager_specs"]
  assert r["jit_specs"] == EXPECTED_NNX_MOE[layout], r["jit_specs"]
  assert r["gate_up_shards"] == MESH[1]
  # The default order of the kernel layout is gate_up_pairs on this mesh too (eager, through
  # eval_shape + jit, and on the stored pytree).
  assert r["gate_up_pairs"] == [layout == "pairs"] * 3, r
  assert r["w13_canonical"], r  # the w13 property gives [gate; up] back
  # Rows per tensor shard: a pairs w13 is stored as the unsharded pairs layer stores it (whole
  # tiles per shard are each shard's own pairs); a [gate; up] one is reordered. The bias is
  # reordered per shard either way.
  assert r["w13_rows_unsharded"] == (layout == "pairs"), r
  assert r["w13_bias_per_shard"], r


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_nnx_moe_sharded_output_equals_one_device(multidevice, layout):
  r = multidevice[f"nnx_moe/{layout}"]
  assert multidevice["nnx_single_rel"] <= TOL and multidevice["nnx_single_pairs_rel"] <= TOL
  assert r["rel"] <= TOL, r
  assert r["sharded_vs_single"] <= SHARDED_REL and r["eager_vs_single"] <= SHARDED_REL, r
  assert r["no_mesh_bitwise"], r
  # It ran as sharded_fused_moe: one all-reduce of the partials, no weight gathered.
  c = r["collectives"]
  assert c["all-gather"] == 0 and c["all-to-all"] == 0 and c["all-reduce"] >= 1, c


def test_nnx_moe_expert_parallel_and_relu2(multidevice):
  ep = multidevice["nnx_moe_ep8"]
  assert ep["bitwise"] and ep["spec"] == "P('expert',)" and ep["gate_up_shards"] == 1
  relu = multidevice["nnx_moe_relu2"]
  assert relu["rel"] <= SHARDED_REL and relu["gate_up_shards"] == 1, relu
  assert relu["spec"] == "P('expert', 'model')", relu


def test_nnx_moe_refuses_a_different_tensor_axis_size(multidevice):
  msg = multidevice["nnx_moe_other_mesh"]
  assert "stored for a tensor axis of size 4" in msg and "has size 2" in msg, msg


def test_nnx_linear_eager_from_weight_made_before_the_mesh(multidevice):
  r = multidevice["nnx_linear"]
  assert r["packed"] == "P('model', 'expert')" and r["bias"] == "P('model',)", r
  assert r["rel"] <= 5e-3, r


@pytest.mark.parametrize("layout", ["checkpoint", "prepared"])
def test_linen_dense_created_sharded(multidevice, layout):
  r = multidevice[f"linen_dense/{layout}"]
  codes, scales = ("qweight", "qscales") if layout == "prepared" else ("packed", "scales")
  assert r["boxed"] == "Partitioned"
  s = r["specs"]
  assert s[f"nvfp4/{codes}"] == "P('model',)" and s[f"nvfp4/{scales}"] == "P('model',)", s
  assert s["nvfp4/global_scale"] == "P()" and s["params/bias"] == "P('model',)", s
  if layout == "prepared":
    assert s["nvfp4/shape"] == "P()", s
  assert r["same_values"] and r["rel"] <= 1e-2, r


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_linen_moe_created_and_loaded_sharded(multidevice, layout):
  r = multidevice[f"linen_moe/{layout}"]
  want = {f"nvfp4/{k}": v for k, v in EXPECTED_NNX_MOE[layout].items()
          if not k.endswith("bias") and k != "router"}
  want.update({"params/router": "P()", "params/w13_bias": "P('expert', 'model')",
               "params/w2_bias": "P('expert',)", "nvfp4/w13_gate_up_shards": "P()"})
  if layout != "checkpoint":
    want.update({"nvfp4/w13_shape": "P()", "nvfp4/w2_shape": "P()"})
  assert r["specs"] == want, r["specs"]
  assert r["loaded_specs"] == want, r["loaded_specs"]
  records = {"w13_gate_up_shards": [MESH[1]]}
  if layout == "pairs":
    records["w13_gate_up_pairs"] = [8]
  assert r["records"] == records, r
  assert r["init_vs_one_device"] <= SHARDED_REL, r
  assert r["loaded_vs_single"] <= SHARDED_REL and r["loaded_rel"] <= TOL, r
  # The same fused_moe / sharded_fused_moe calls as the NNX layer of the same order: same bits.
  assert r["plain_vs_nnx"] == 0.0 and r["loaded_vs_nnx_sharded"] == 0.0, r


def test_linen_moe_old_state_and_lost_pairs_record(multidevice):
  r = multidevice["linen_moe/pairs"]
  # State without the pairs record runs as [gate; up] per shard under a layer whose init stores
  # pairs: the bits of the fuse_activation=False layer.
  assert r["old_state_vs_prepared"], r
  # Negative control: pairs rows read as [gate; up] ones are far off.
  assert r["record_lost_rel"] > 0.1, r


@pytest.mark.parametrize("case", list(PAIRS_CASES))
def test_gate_up_pairs_sharded_equals_one_device(multidevice, case):
  r = multidevice[f"pairs/{case}"]
  shape, axes, _, tensor_axis, _ = PAIRS_CASES[case]
  tp = 1 if tensor_axis is None else dict(zip(axes, shape))[tensor_axis]
  assert r["gate_up_pairs"] and r["gate_up_shards"] == tp, r
  records = {"w13_gate_up_pairs": [8]}
  if tp > 1:
    records["w13_gate_up_shards"] = [tp]
  assert r["linen_records"] == records, r
  assert r["one_rel"] <= TOL and r["rel"] <= TOL and r["vs_one"] <= SHARDED_REL, r
  if tp == 1:  # pure expert parallel: every partial is exact (parallel/moe.py's property)
    assert r["bitwise_vs_one"], r
  c = r["collectives"]
  assert c["all-gather"] == 0 and c["all-to-all"] == 0 and c["all-reduce"] >= 1, c
  assert r["linen_vs_nnx_bitwise"], r


@pytest.mark.parametrize("case", list(PAIRS_CASES))
def test_gate_up_pairs_negative_controls(multidevice, case):
  """The comparisons above catch a wrong order: pairs rows taken for [gate; up] ones, or (with
  a tensor split) the w13 bias not reordered per shard."""
  r = multidevice[f"pairs/{case}"]
  assert r["misread_rel"] > 0.1, r
  if r["bias_unordered_rel"] is not None:
    assert r["bias_unordered_rel"] > BIAS_ORDER_REL, r


def test_bad_splits_raise_clear_errors(multidevice):
  e = multidevice["errors"]
  expect = {
      "nnx_moe_experts": r"ValueError: NVFP4MoE: E = 6 experts .*'model' of size 4",
      "nnx_moe_inter": r"ValueError: NVFP4MoE: I = 96 .*'model' of size 4.*scale blocks",
      "nnx_linear_n": r"ValueError: NVFP4Linear: .*N dim \(size 40\).*'model' of size 4.*"
                      r"multiple of 16 rows",
      "nnx_linear_n_ckpt": r"ValueError: NVFP4Linear: .*N dim \(size 42\).*whole number",
      "nnx_linear_k": r"ValueError: NVFP4Linear: .*K dim \(size 96\).*'model' of size 4.*"
                      r"multiple of 16",
      "nnx_linear_axis": r"ValueError: NVFP4Linear: .*'tensor' is not an axis of the mesh",
      "linen_dense_k": r"ValueError: NVFP4Dense: .*K dim \(size 96\).*multiple of 16",
      "linen_dense_n": r"ValueError: NVFP4Dense: .*N dim \(size 40\).*multiple of 16 rows",
      "linen_moe_inter": r"ValueError: NVFP4MoE: I = 96 .*'model' of size 4",
  }
  for name, pattern in expect.items():
    assert re.search(pattern, e[name]), (name, e[name])


# ----------------------------------------------------------------------------- one device

def test_moe_sharding_needs_the_mesh_for_gated_tensor_parallel(rng):
  w13, w2 = nf.quantize(jnp.ones((4, 64, 32))), nf.quantize(jnp.ones((4, 32, 32)))
  with pytest.raises(ValueError, match="tensor_axis with a gated activation needs the mesh"):
    NVFP4MoE.from_nvfp4(np.ones((4, 32)), w13, w2, top_k=2, tensor_axis="model")
  with pytest.raises(ValueError, match="two ways to split the experts"):
    NVFP4MoE.from_nvfp4(np.ones((8, 32)), w13, w2, top_k=2, expert_map=[0, 1, 2, 3] + [-1] * 4,
                        expert_axis="expert")
  with pytest.raises(ValueError, match="two ways to split the experts"):
    L.NVFP4MoE(32, 4, top_k=2, expert_map=(0, 1, 2, 3), expert_axis="expert").init(
        jax.random.key(0), jnp.ones((2, 32), jnp.bfloat16))


def test_gate_up_canonical_inverts_per_shard(rng):
  from jax_nvfp4 import parallel
  w = nf.quantize(jnp.asarray(rng.standard_normal((2, 128, 64)), jnp.float32))
  b = rng.standard_normal((2, 128)).astype(np.float32)
  for tp in (1, 2, 4):
    for ww in (w, nf.prepare(w)):
      moved, mb = parallel.gate_up_per_shard(ww, tp, b)
      back, bb = parallel.gate_up_canonical(moved, tp, mb)
      for a, c in zip(jax.tree.leaves(back), jax.tree.leaves(ww)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
      np.testing.assert_array_equal(np.asarray(bb), b)
      if tp > 1:
        assert not np.array_equal(np.asarray(mb), b)


def test_gate_up_per_shard_keeps_a_pairs_w13_and_moves_its_bias(rng):
  """A gate_up_pairs w13 is per shard already (whole 16-row tiles): returned as it is, flag
  kept; its bias moves as a [gate; up] one does (NumPy order, independent of the helper).
  A split that would cut a tile is refused."""
  from jax_nvfp4 import parallel
  i = 64                                     # 8 pair tiles
  w = nf.prepare(nf.quantize(jnp.asarray(rng.standard_normal((2, 2 * i, 64)), jnp.float32)),
                 gate_up_pairs=True)
  b = rng.standard_normal((2, 2 * i)).astype(np.float32)
  for tp in (2, 4, 8):
    moved, mb = parallel.gate_up_per_shard(w, tp, b)
    assert moved is w and moved.gate_up_pairs
    np.testing.assert_array_equal(np.asarray(mb), _per_shard_rows(b, tp))
    back, bb = parallel.gate_up_canonical(moved, tp, mb)
    assert back is w
    np.testing.assert_array_equal(np.asarray(bb), b)
  for helper in (parallel.gate_up_per_shard, parallel.gate_up_canonical):
    with pytest.raises(ValueError, match=r"I = 64 does not split over 16 tensor shards into "
                                         r"whole 16-row gate/up tiles"):
      helper(w, 16, b)
