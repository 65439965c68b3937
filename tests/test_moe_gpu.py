"""fused_moe through the CUDA grouped-GEMM kernel at full peer shapes (skipped without a GPU).

Two references: the float64 NumPy layer (tests/numpy_moe_reference.py) with the bf16/fp16
tolerances of tests/test_moe.py, and the same NumPy layer rounding to the activation dtype at
the points the implementation rounds (activation, each GEMM2 row, result; GEMM1's output too
unless the activation is fused: a w13 prepared with ``gate_up_pairs=True``, whose GEMM1
applies it in its epilogue): the kernel may differ from that one only by float32 accumulation
order, so its bound is tight.
"""

import re
import tempfile

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jax_nvfp4 as nf
from jax_nvfp4.bench.common import gpu_events
from jax_nvfp4.moe import capacity, choose_block_m
from jax_nvfp4.ops import moe as moe_ops
from jax_nvfp4.ops import moe_align
from tests import numpy_moe_reference as ref
from tests.test_moe import _distinct_topk, check_fused_activation_primitive, random_experts

pytestmark = pytest.mark.gpu

TOL = {jnp.bfloat16: 5e-3, jnp.float16: 1e-3}
# Against the NumPy layer that rounds where we round: only accumulation order differs, which
# flips a small share of roundings by one unit.
TOL_ROUNDED = {jnp.bfloat16: 1.5e-3, jnp.float16: 3e-4}
ROUND = {jnp.bfloat16: ml_dtypes.bfloat16, jnp.float16: np.float16}


@pytest.fixture(autouse=True)
def kernel_built():
  if moe_ops.CUDA_TARGET not in moe_ops._ffi.REGISTERED:
    pytest.skip("jax_nvfp4 was built without the grouped MoE kernel")


def poisoned(fn, *args, out_shape, dtype, **kw):
  """Fills freshly freed device memory of the output's size with NaN first, so that an output
  row the kernel forgets to write (or to zero) shows up as NaN."""
  poison = jnp.full(out_shape, jnp.nan, dtype).block_until_ready()
  del poison
  return fn(*args, **kw)


_fused = jax.jit(nf.fused_moe, static_argnames=("top_k", "routing", "activation", "limit",
                                                "alpha", "block_m"))


def _layer(rng, m, h, i, e, *, gated=True, dtype=jnp.bfloat16):
  w13 = random_experts(rng, e, 2 * i if gated else i, h, out_std=2.0)
  w2 = random_experts(rng, e, h, i)
  x = jnp.asarray(rng.standard_normal((m, h)), dtype)
  return x, w13, w2


def _check(x, w13, w2, out, tw, ti, *, tol=None, **kw):
  dtype = jnp.bfloat16 if x.dtype == jnp.bfloat16 else jnp.float16
  out = np.asarray(out, np.float64)
  assert out.shape == x.shape and np.isfinite(out).all(), "NaN-poisoned or overflowed rows"
  x64 = np.asarray(x, np.float64)
  d13, d2 = ref.dequantize_experts(w13), ref.dequantize_experts(w2)
  exact = ref.moe(x64, d13, d2, tw, ti, **kw)
  rounded = ref.moe(x64, d13, d2, tw, ti, round_dtype=ROUND[dtype], **kw)
  rounded = rounded.astype(ROUND[dtype]).astype(np.float64)
  tol = tol or TOL
  assert ref.rel_l2(out, exact) <= tol[dtype]
  assert ref.rel_l2(out, rounded) <= TOL_ROUNDED[dtype]


# ----------------------------------------------------------------------------- peer shapes

PEER_M = [1, 123, 666]
PEER_IH = [(128, 256), (128, 2048), (1024, 256), (1024, 2048)]
PEER_EK = [(5, 2), (12, 3), (12, 2), (5, 3)]


@pytest.mark.parametrize("m", PEER_M)
@pytest.mark.parametrize("i, h", PEER_IH)
@pytest.mark.parametrize("e, k", PEER_EK)
def test_peer_shapes_bf16(rng, m, i, h, e, k):
  x, w13, w2 = _layer(rng, m, h, i, e)
  logits = rng.standard_normal((m, e)).astype(np.float32)
  out = poisoned(_fused, x, w13, w2, router_logits=logits, top_k=k, out_shape=(m * k, 2 * i),
                 dtype=jnp.bfloat16)
  tw, ti = ref.route(logits, k)
  _check(x, w13, w2, out, tw, ti)


@pytest.mark.parametrize("pairs", [True, False])
@pytest.mark.parametrize("m, i, h, e, k", [(1, 1024, 2048, 12, 3), (123, 128, 256, 5, 2),
                                           (666, 1024, 2048, 12, 3), (666, 128, 2048, 5, 3)])
def test_peer_shapes_fp16(rng, m, i, h, e, k, pairs):
  """Both w13 layouts: gate/up pairs (the activation fused into GEMM1) and plain [gate; up]
  (GEMM1 writes [M*k, 2I], rounded, and XLA applies the activation)."""
  x, w13, w2 = _layer(rng, m, h, i, e, dtype=jnp.float16)
  tw, ti = _distinct_topk(rng, m, e, k)
  out = poisoned(_fused, x, nf.prepare(w13, gate_up_pairs=pairs), nf.prepare(w2),
                 topk_weights=tw, topk_ids=ti, out_shape=(m, h), dtype=jnp.float16)
  _check(x, w13, w2, out, tw, ti, gemm1_rounded=not pairs)


@pytest.mark.parametrize("m", [1, 64, 256])
@pytest.mark.parametrize("i, h", [(1024, 1024), (2048, 2048)])
@pytest.mark.parametrize("e, k", [(8, 2), (64, 4)])
def test_relu2_peer_shapes(rng, m, i, h, e, k):
  x, w13, w2 = _layer(rng, m, h, i, e, gated=False)
  tw, ti = _distinct_topk(rng, m, e, k)
  out = poisoned(_fused, x, w13, w2, topk_weights=tw, topk_ids=ti, activation="relu2",
                 out_shape=(m * k, i), dtype=jnp.bfloat16)
  # GEMM1 squares its float32 result (fused: relu2 needs no row order).
  _check(x, w13, w2, out, tw, ti, activation_kind="relu2", gemm1_rounded=False)


@pytest.mark.parametrize("limit", [5.0, 7.0, 10.0, 15.0])
@pytest.mark.parametrize("gs", [2.0**-13, 2.0**-11, 2.0**-9])
def test_swiglu_clamp_peer_shapes(rng, limit, gs):
  m, h, i, e, k = 64, 4096, 2048, 8, 6
  w13 = random_experts(rng, e, 2 * i, h, scale_range=(64.0, 448.0), gs=gs)
  w2 = random_experts(rng, e, h, i, out_std=1.0 / limit)
  d13 = ref.dequantize_experts(w13)
  x_std = 2 * limit / (np.sqrt(h) * np.sqrt(np.mean(d13 ** 2)))
  x = jnp.asarray(rng.standard_normal((m, h)) * x_std, jnp.bfloat16)
  tw, ti = _distinct_topk(rng, m, e, k)
  out = _fused(x, w13, w2, topk_weights=tw, topk_ids=ti, limit=limit)
  _check(x, w13, w2, out, tw, ti, limit=limit)
  hid = np.einsum("mh,enh->men", np.asarray(x, np.float64), d13)
  assert np.mean(np.abs(hid[..., i:]) > limit) > 0.1  # the clamp is active


@pytest.mark.parametrize("activation, limit, with_bias, alpha", [("swiglu", None, True, None),
                                                                 ("swiglu", 5.0, False, None),
                                                                 ("gptoss", 7.0, True, None),
                                                                 ("gptoss", 7.0, True, 1.0),
                                                                 ("relu2", None, True, None)])
@pytest.mark.parametrize("m, h, i, e, k", [(1, 2048, 768, 16, 8), (3, 4096, 1024, 8, 2),
                                           (257, 1040, 1008, 6, 3)])
def test_primitive_fused_activations_on_the_kernel(rng, activation, limit, with_bias, alpha, m,
                                                   h, i, e, k):
  """GEMM1's epilogue activations through the kernel (k-sliced decode, unsliced, prefill; a
  partial K unit at H = 1040) against float64, as tests/test_moe.py checks the reference."""
  check_fused_activation_primitive(rng, activation, limit, with_bias, m, h, i, e, k,
                                   alpha=alpha)


# ----------------------------------------------------------------------------- properties

def test_expert_map_partition_and_zero_rows(rng):
  m, h, i, e, k = 200, 2048, 1024, 12, 3
  x, w13, w2 = _layer(rng, m, h, i, e)
  tw, ti = _distinct_topk(rng, m, e, k)
  full = np.asarray(_fused(x, w13, w2, topk_weights=tw, topk_ids=ti), np.float64)
  total = np.zeros_like(full)
  for local in (np.array([0, 5, 7]), np.array([1, 2, 3, 4, 6, 8, 9, 10, 11])):
    emap = np.full(e, -1, np.int32)
    emap[local] = np.arange(len(local))
    sub = lambda w: jax.tree.map(lambda a: a[local], w)
    out = poisoned(_fused, x, sub(w13), sub(w2), topk_weights=tw, topk_ids=ti, expert_map=emap,
                   out_shape=(m * k, h), dtype=jnp.bfloat16)
    _check(x, sub(w13), sub(w2), out, tw, ti, expert_map=emap)
    none_local = ~np.isin(ti, local).any(axis=1)
    assert not np.asarray(out)[none_local].any()
    total += np.asarray(out, np.float64)
  assert ref.rel_l2(total, full) <= 5e-3


@pytest.mark.parametrize("m, pairs", [(300, False), (300, True), (1, True)])
def test_gptoss_with_biases_and_deepseek_routing(rng, m, pairs):
  """gpt-oss's activation with both biases; with gate/up pairs GEMM1 applies it (the bias
  reordered with the rows), at prefill and at decode."""
  h, i, e, k = 2048, 1024, 32, 4
  w13 = random_experts(rng, e, 2 * i, h, out_std=4.0)
  w2 = random_experts(rng, e, h, i, out_std=0.3)
  b13 = rng.standard_normal((e, 2 * i)).astype(np.float32)
  b2 = rng.standard_normal((e, h)).astype(np.float32)
  x = jnp.asarray(rng.standard_normal((m, h)), jnp.bfloat16)
  logits = rng.standard_normal((m, e)).astype(np.float32)
  bias = rng.uniform(-0.2, 0.2, e).astype(np.float32)
  cfg = nf.RoutingConfig.deepseek_v3(k, n_group=8, topk_group=3, routed_scaling_factor=2.5,
                                     correction_bias=bias)
  out = jax.jit(lambda *a: nf.fused_moe(*a[:3], router_logits=a[3], routing=a[4],
                                        activation="gptoss", limit=7.0, w13_bias=a[5],
                                        w2_bias=a[6]))(
      x, nf.prepare(w13, gate_up_pairs=True) if pairs else w13, w2, logits, cfg, b13, b2)
  tw, ti = ref.route(logits, k, scoring="sigmoid", n_group=8, topk_group=3,
                     routed_scaling_factor=2.5, correction_bias=bias)
  _check(x, w13, w2, out, tw, ti, activation_kind="gptoss", limit=7.0, b13=b13, b2=b2,
         gemm1_rounded=not pairs)


@pytest.mark.parametrize("case", ["empty_experts", "one_expert", "m1", "m_not_multiple"])
@pytest.mark.parametrize("block_m", [8, 16, 32, 64])
def test_edge_routings(rng, case, block_m):
  e, k = 16, 2
  m = {"m1": 1, "m_not_multiple": 77, "one_expert": 666}.get(case, 150)
  x, w13, w2 = _layer(rng, m, 1024, 512, e)
  tw, ti = _distinct_topk(rng, m, e, k)
  if case == "empty_experts":
    ti = np.stack([ti[:, 0] % 3, 3 + ti[:, 1] % 2], 1).astype(np.int32)  # experts 0..4 only
  elif case == "one_expert":
    ti = np.stack([np.full(m, 9), np.full(m, 2)], 1).astype(np.int32)
  out = poisoned(_fused, x, w13, w2, topk_weights=tw, topk_ids=ti, block_m=block_m,
                 out_shape=(m * k, 1024), dtype=jnp.bfloat16)
  _check(x, w13, w2, out, tw, ti)


def test_sizes_not_multiples_of_the_tile(rng):
  m, h, i, e, k = 37, 208, 96, 6, 2     # N13 = 192, K = 208 and 96: padded k64 chunks
  x, w13, w2 = _layer(rng, m, h, i, e)
  tw, ti = _distinct_topk(rng, m, e, k)
  _check(x, w13, w2, _fused(x, w13, w2, topk_weights=tw, topk_ids=ti), tw, ti)


def test_deterministic_eager_jit_prepared_bitwise(rng):
  m, h, i, e, k = 64, 2048, 768, 128, 8
  x, w13, w2 = _layer(rng, m, h, i, e)
  tw, ti = _distinct_topk(rng, m, e, k)
  p13, p2 = nf.prepare(w13), nf.prepare(w2)
  a = np.asarray(_fused(x, p13, p2, topk_weights=tw, topk_ids=ti))
  for _ in range(3):
    np.testing.assert_array_equal(np.asarray(_fused(x, p13, p2, topk_weights=tw, topk_ids=ti)), a)
  np.testing.assert_array_equal(np.asarray(_fused(x, w13, w2, topk_weights=tw, topk_ids=ti)), a)
  np.testing.assert_array_equal(np.asarray(nf.fused_moe(x, p13, p2, topk_weights=tw,
                                                        topk_ids=ti)), a)


@pytest.mark.parametrize("m, h, i, e, k, block_m", [(1, 7168, 1536, 16, 8, 8),
                                                    (2, 6144, 1536, 32, 4, 8),
                                                    (1, 6400, 1008, 16, 6, 8)])
@pytest.mark.parametrize("gate_up_pairs", [True, False])
def test_cluster_split_k_bitwise_equal_to_ticket_path(rng, monkeypatch, m, h, i, e, k, block_m,
                                                      gate_up_pairs):
  """At decode sizes the grouped GEMM splits K; where the GPU has clusters (sm_90) the splits
  reduce through distributed shared memory. Same split order, same fp32 sums: the layer must
  match the global-workspace ticket path bit for bit, and the reference within tolerance; with
  the activation fused into GEMM1 (gate/up pairs) and without."""
  if moe_ops.moe_cluster_limit(block_m) < 2:
    pytest.skip("no thread-block cluster path on this GPU (sm_90 only)")
  # Splits across blocks only happen without k-slices (the default at block_m 8).
  monkeypatch.setattr(moe_ops, "choose_moe_k_slices", lambda *a, **kw: 1)
  x, w13, w2 = _layer(rng, m, h, i, e)
  tw, ti = _distinct_topk(rng, m, e, k)
  p13, p2 = nf.prepare(w13, gate_up_pairs=gate_up_pairs), nf.prepare(w2)
  pairs = m * k
  slots = -(-(pairs + min(e, pairs) * (block_m - 1)) // block_m) * block_m  # align.py's P
  # GEMM 1 splits K and reduces in a cluster.
  assert moe_ops.use_moe_cluster(moe_ops.choose_moe_splits(slots, 2 * i, h, block_m), block_m)
  layer = lambda: jax.jit(lambda *a: nf.fused_moe(*a, topk_weights=tw, topk_ids=ti,  # noqa: E731
                                                   block_m=block_m))
  clustered = np.asarray(poisoned(layer(), x, p13, p2, out_shape=x.shape, dtype=x.dtype))
  _check(x, w13, w2, clustered, tw, ti, gemm1_rounded=not gate_up_pairs)
  monkeypatch.setattr(moe_ops, "moe_cluster_limit", lambda *a, **kw: 0)
  tickets = np.asarray(layer()(x, p13, p2))
  np.testing.assert_array_equal(clustered, tickets)


@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("gate_up_pairs", [True, False])
def test_long_units_bitwise_equal_to_four_chunk_units(rng, monkeypatch, m, gate_up_pairs):
  """By default the unsliced block_m-8 GEMMs with K >= 2048 run 8-chunk pipeline units;
  JAX_NVFP4_MOE_LONG_UNITS=0 keeps 4-chunk ones. The k16 steps are added in the same order
  either way, so the layer is bitwise the 4-chunk one's; against the float64 layer with poisoned
  outputs, and the profiler's kernel names show which block each setting ran. GEMM 1's K = 2048
  (whole units), GEMM 2's K = 2112 (33 chunks: the last unit holds one), 8 experts per token (8
  or more token tiles: unsliced, unsplit). Each setting compiles its own function: the variable
  is read when the launch is issued, which a command buffer does once when it records."""
  h, i, e, k = 2048, 2112, 16, 8
  x, w13, w2 = _layer(rng, m, h, i, e)
  tw, ti = _distinct_topk(rng, m, e, k)
  p13, p2 = nf.prepare(w13, gate_up_pairs=gate_up_pairs), nf.prepare(w2)
  block_m = choose_block_m(m, k, e)
  slots = capacity(m * k, e, block_m)
  assert block_m == 8 and slots // block_m > moe_ops.MOE_K_SLICES_MAX_TOKEN_TILES
  assert moe_ops.choose_moe_splits(slots, 2 * i, h, block_m) == 1
  assert moe_ops.choose_moe_splits(slots, h, i, block_m) == 1
  layer = lambda: jax.jit(lambda *a: nf.fused_moe(*a, topk_weights=tw, topk_ids=ti))  # noqa: E731
  monkeypatch.delenv("JAX_NVFP4_MOE_LONG_UNITS", raising=False)
  default = layer()
  long_units = np.asarray(poisoned(default, x, p13, p2, out_shape=x.shape, dtype=x.dtype))
  _check(x, w13, w2, long_units, tw, ti, gemm1_rounded=not gate_up_pairs)
  assert _grouped_gemm_kernels(default, x, p13, p2) == {"1, true, 1, 8, 8"}  # both GEMMs
  monkeypatch.setenv("JAX_NVFP4_MOE_LONG_UNITS", "0")
  short_units = layer()
  np.testing.assert_array_equal(np.asarray(short_units(x, p13, p2)), long_units)
  assert _grouped_gemm_kernels(short_units, x, p13, p2) == {"1, true, 1, 8, 0"}


def _grouped_gemm_kernels(fn, *args) -> set[str]:
  """The template arguments after the dtype of every grouped-GEMM kernel one call of fn ran
  (the profiler's demangled names: MT, kMoe, KS, XR and SC, defaults included)."""
  jax.block_until_ready(fn(*args))
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, create_perfetto_trace=True):
      jax.block_until_ready(fn(*args))
    names = [e["name"] for e in gpu_events(d)]
  found = (re.search(r"nvfp4_kernel<[^,]+, (1, true[^>]*)>", name) for name in names)
  return {f.group(1) for f in found if f}


def _even_experts_local(w13, w2, e):
  """This device holds experts 0, 2, 4, ...: their weights and the expert_map keyword."""
  local = np.arange(0, e, 2)
  emap = np.full(e, -1, np.int32)
  emap[local] = np.arange(len(local))
  w13, w2 = (jax.tree.map(lambda a: a[local], w) for w in (w13, w2))
  return w13, w2, dict(expert_map=emap)


@pytest.mark.parametrize("m, h, i, e, k, dtype, mapped, forced", [
    (1, 4096, 2048, 8, 2, jnp.bfloat16, False, False),   # Mixtral-like decode: the default
    (2, 2048, 4096, 6, 2, jnp.float16, False, False),
    (1, 7168, 1536, 16, 8, jnp.bfloat16, False, True),   # K = 112 chunks: a partial k-unit
    (3, 6400, 1008, 16, 6, jnp.float16, False, True),    # K = 100 and 16 chunks
    (2, 208, 48, 6, 2, jnp.bfloat16, False, True),       # N = 96 and 208, K = 4 and 1 chunks
    (5, 2048, 768, 24, 4, jnp.bfloat16, True, True)])    # experts not local (-1 blocks)
@pytest.mark.parametrize("slices", [8, 4])
def test_k_sliced_decode_gemms(rng, monkeypatch, m, h, i, e, k, dtype, mapped, forced, slices):
  """At block_m 8 the GEMMs can split K among the 8 warps of each block (8 slices of one 16-row
  N tile at a time, or 4 of a pair; several per block, slice sums added in shared memory): the
  default for few token tiles and K a multiple of 2048 (checked), and here each slice count is
  forced, also for the shapes the rule leaves unsliced (the kernel takes any). Checked against
  the float64 layer with poisoned outputs, bitwise repeatable, and the unsliced launch against
  the same reference."""
  x, w13, w2 = _layer(rng, m, h, i, e, dtype=dtype)
  tw, ti = _distinct_topk(rng, m, e, k)
  w13, w2, kw = _even_experts_local(w13, w2, e) if mapped else (w13, w2, {})
  p13, p2 = nf.prepare(w13, gate_up_pairs=True), nf.prepare(w2)
  assert choose_block_m(m, k, e) == 8
  slots = capacity(m * k, e, 8)
  if not forced:
    k_sliced = (moe_ops.PAIR_K_SLICES, moe_ops.MOE_K_SLICES)
    assert moe_ops.choose_moe_k_slices(slots, 2 * i, h, 8, m) in k_sliced
    assert moe_ops.choose_moe_k_slices(slots, h, i, 8, m) in k_sliced
  monkeypatch.setattr(moe_ops, "choose_moe_k_slices", lambda *a, **kw: slices)
  layer = lambda: jax.jit(lambda *a: nf.fused_moe(*a, topk_weights=tw, topk_ids=ti,  # noqa: E731
                                                   **kw))
  sliced_fn = layer()
  sliced = np.asarray(poisoned(sliced_fn, x, p13, p2, out_shape=x.shape, dtype=dtype))
  _check(x, w13, w2, sliced, tw, ti, gemm1_rounded=False, **kw)
  for _ in range(2):
    np.testing.assert_array_equal(np.asarray(sliced_fn(x, p13, p2)), sliced)
  # fused_moe hints the token count: at M <= 4 the blocks held 1, 2 or 4 x rows. The 8-row
  # block (no hint) makes the same sums in the same order with 8 slices; the 4-slice block's
  # short tiles take slices twice as long (dense k_sliced_unit_k), so with 4 slices the 4-row
  # block is the bitwise twin and the 8-row block is checked against the reference. (Above 4
  # tokens the hint picks the 8-row block itself, so there is nothing to compare.)
  if m <= 4:
    with monkeypatch.context() as mp:
      _gemms_with_row_hint(mp, 0)
      eight = np.asarray(poisoned(layer(), x, p13, p2, out_shape=x.shape, dtype=dtype))
    if slices == moe_ops.MOE_K_SLICES:
      np.testing.assert_array_equal(eight, sliced)
    else:
      _check(x, w13, w2, eight, tw, ti, gemm1_rounded=False, **kw)
      with monkeypatch.context() as mp:
        _gemms_with_row_hint(mp, 4)
        four = np.asarray(poisoned(layer(), x, p13, p2, out_shape=x.shape, dtype=dtype))
      np.testing.assert_array_equal(four, sliced)
  monkeypatch.setattr(moe_ops, "choose_moe_k_slices", lambda *a, **kw: 1)
  unsliced = np.asarray(poisoned(layer(), x, p13, p2, out_shape=x.shape, dtype=dtype))
  _check(x, w13, w2, unsliced, tw, ti, gemm1_rounded=False, **kw)


def _gemms_with_row_hint(mp, rows):
  """fused_moe's grouped GEMMs run with the expert_rows hint ``rows`` (0: none, the 8-row
  decode block; 4: the 4-row block)."""
  gemm = moe_ops.nvfp4_moe_gemm
  mp.setattr(moe_ops, "nvfp4_moe_gemm", lambda *a, **kw: gemm(*a, **{**kw, "expert_rows": rows}))


@pytest.mark.parametrize("expert_rows", [1, 2, 4])
@pytest.mark.parametrize("slices", [8, 4])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_short_decode_blocks_take_any_tile_content(rng, monkeypatch, expert_rows, slices, dtype):
  """With expert_rows = 1, 2 or 4 the k-sliced decode block (8 or 4 slices) holds that many x rows
  and runs its tile in passes of that many slots, one per group that holds a row. A hand schedule
  the hint does not describe (tiles of 0, 1, 3 and 8 rows, rows after padding slots, sentinels -1
  and >= num_rows_out, a -1 tile, a tile past num_padded) through the kernel with poisoned output
  memory: bitwise equal to the block that splits K the same way (8 slices: the 8-row block; 4
  slices, whose short tiles take slices twice as long: another short tile), the contract's rows
  within tolerance (also the 8-row block's), every other row zero.
  """
  from tests.test_moe import _contract_numpy
  e, n, k, bm = 3, 300, 1040, 8  # N and K off the tile (K: 16.25 k64 chunks)
  w = random_experts(rng, e, n, k)
  rows_out, gd = 20, 2
  x = jnp.asarray(rng.standard_normal((10, k)), dtype)
  pad = 99
  sids = np.full(48, pad, np.int32)
  sids[0:8] = [pad, 0, -1, 7, pad, pad, pad, 3]     # expert 2: rows after padding
  sids[8:11] = [1, 2, 4]                             # expert -1: not local
  sids[16:24] = [5, 6, 8, 9, 10, 11, 12, 13]         # expert 0: a full tile
  sids[24] = 14                                      # expert 1: one row
  sids[40:44] = [15, 16, 17, 18]                     # past num_padded: never run
  block_expert = np.array([2, -1, 0, 1, 1, 0], np.int32)
  num_padded = 40
  tw = rng.uniform(0.1, 1, rows_out).astype(np.float32)
  bias = rng.standard_normal((e, n)).astype(np.float32)
  p = nf.prepare(w)
  al = nf.Alignment(jnp.asarray(sids), jnp.asarray(block_expert),
                    jnp.array([num_padded], jnp.int32), block_m=bm, num_pairs=rows_out)
  written = [0, 7, 3, 5, 6, 8, 9, 10, 11, 12, 13, 14]
  untouched = np.setdiff1d(np.arange(rows_out), written)
  monkeypatch.setattr(moe_ops, "choose_moe_k_slices", lambda *a, **kw: slices)
  gemm = lambda hint: jax.jit(lambda xx: nf.nvfp4_moe_gemm(  # noqa: E731
      xx, p, al, gather_div=gd, num_rows_out=rows_out, topk_weights=tw, bias=bias,
      expert_rows=hint))
  short = np.asarray(poisoned(gemm(expert_rows), x, out_shape=(rows_out, n), dtype=dtype))
  eight = np.asarray(poisoned(gemm(0), x, out_shape=(rows_out, n), dtype=dtype))
  twin = eight if slices == 8 else np.asarray(
      poisoned(gemm(4 if expert_rows != 4 else 1), x, out_shape=(rows_out, n), dtype=dtype))
  assert np.isfinite(short).all() and not short[untouched].any()
  np.testing.assert_array_equal(short, twin)
  want = _contract_numpy(x, w, sids, block_expert, num_padded, tw, bias, gather_div=gd,
                         num_rows_out=rows_out, block_m=bm)
  assert ref.rel_l2(short[written], want[written]) <= 4e-3
  assert not eight[untouched].any() and ref.rel_l2(eight[written], want[written]) <= 4e-3


@pytest.mark.parametrize("ids", [[[3, 3]], [[1, 1], [1, 5]], [[2, 2], [2, 2], [2, 2], [2, 6]]])
def test_repeated_expert_ids_at_decode(rng, monkeypatch, ids):
  """A caller's top-k with an expert repeated in a token's row gives that expert more rows than
  tokens: the k-sliced decode blocks sized by the token count (1, 2, 4 x rows) take extra passes
  and lose nothing."""
  m, h, i, e = len(ids), 2048, 1024, 8
  monkeypatch.setattr(moe_ops, "choose_moe_k_slices", lambda *a, **kw: moe_ops.MOE_K_SLICES)
  x, w13, w2 = _layer(rng, m, h, i, e)
  ti = np.asarray(ids, np.int32)
  tw = rng.uniform(0.2, 1.0, ti.shape).astype(np.float32)
  p13, p2 = nf.prepare(w13, gate_up_pairs=True), nf.prepare(w2)
  layer = jax.jit(lambda *a: nf.fused_moe(*a, topk_weights=tw, topk_ids=ti))  # a fresh trace
  out = poisoned(layer, x, p13, p2, out_shape=x.shape, dtype=x.dtype)
  _check(x, w13, w2, out, tw, ti, gemm1_rounded=False)


@pytest.mark.parametrize("m, h, i, e, k, dtype, tiles, mapped, block_m", [
    (300, 512, 400, 6, 2, jnp.bfloat16, 2, False, 64),   # N = 800 / 512: 7 / 4 N blocks
    (300, 512, 400, 6, 2, jnp.float16, 3, False, 64),    # a ragged last block of N blocks
    (257, 1040, 1008, 4, 3, jnp.bfloat16, 4, True, 64),  # K = 1040 / 1008 (partial units)
    (16, 512, 400, 32, 4, jnp.bfloat16, 2, False, 8),    # decode tiles (block_m 8)
    (5, 1040, 1008, 16, 3, jnp.float16, 2, True, 8),     # decode, partial units, mapped
])
def test_gemms_with_several_n_blocks_per_block(rng, monkeypatch, m, h, i, e, k, dtype, tiles,
                                               mapped, block_m):
  """At block_m 64 (prefill) and 8 (decode) a block can run several N blocks of its token tile
  through one pipeline (the default where K is short and the grid keeps enough waves; forced
  here on small shapes). Against the float64 layer with poisoned outputs, and bitwise equal to
  one N block per block (the same fp32 sums in the same order)."""
  x, w13, w2 = _layer(rng, m, h, i, e, dtype=dtype)
  tw, ti = _distinct_topk(rng, m, e, k)
  w13, w2, kw = _even_experts_local(w13, w2, e) if mapped else (w13, w2, {})
  p13, p2 = nf.prepare(w13, gate_up_pairs=True), nf.prepare(w2)
  assert choose_block_m(m, k, e) == block_m
  layer = lambda: jax.jit(lambda *a: nf.fused_moe(*a, topk_weights=tw, topk_ids=ti,  # noqa: E731
                                                   **kw))
  monkeypatch.setattr(moe_ops, "choose_moe_prefill_tiles", lambda *a, **kw: tiles)
  several = np.asarray(poisoned(layer(), x, p13, p2, out_shape=x.shape, dtype=dtype))
  _check(x, w13, w2, several, tw, ti, gemm1_rounded=False, **kw)
  monkeypatch.setattr(moe_ops, "choose_moe_prefill_tiles", lambda *a, **kw: 1)
  one = np.asarray(poisoned(layer(), x, p13, p2, out_shape=x.shape, dtype=dtype))
  np.testing.assert_array_equal(several, one)


def test_kernel_matches_xla_reference_at_qwen3_prefill(rng):
  """(E, H, I, k) = (128, 2048, 768, 8) at T = 4096 against the reference lowering run by XLA on
  the same GPU (same rounding points, float32 products), the activation fused into GEMM1."""
  m, h, i, e, k = 4096, 2048, 768, 128, 8
  x, w13, w2 = _layer(rng, m, h, i, e)
  logits = jnp.asarray(rng.standard_normal((m, e)), jnp.float32)
  p13, p2 = nf.prepare(w13, gate_up_pairs=True), nf.prepare(w2)
  out = _fused(x, p13, p2, router_logits=logits, top_k=k)
  want = jax.jit(lambda *a: nf.fused_moe(*a[:3], router_logits=a[3], top_k=k,
                                         backend="reference"))(x, p13, p2, logits)
  assert ref.rel_l2(out, np.asarray(want, np.float64)) <= TOL_ROUNDED[jnp.bfloat16]


def test_fp16_epilogue_does_not_overflow(rng):
  """Regression: the global scale multiplies the fp32 accumulator. Here x @ (code x block scale)
  is ~1e5 (past fp16's 65504) while the scaled result is O(1)."""
  m, h, i, e, k = 16, 4096, 512, 4, 2
  w13 = random_experts(rng, e, 2 * i, h, scale_range=(256.0, 448.0), gs=2.0**-13)
  w2 = random_experts(rng, e, h, i, scale_range=(256.0, 448.0), gs=2.0**-14)
  x = jnp.asarray(rng.standard_normal((m, h)), jnp.float16)
  tw, ti = _distinct_topk(rng, m, e, k)
  _check(x, w13, w2, _fused(x, w13, w2, topk_weights=tw, topk_ids=ti), tw, ti)


def test_global_scale_one_with_tiny_block_scales(rng):
  """Regression: checkpoints with global_scale = 1 have subnormal E4M3 block scales."""
  m, h, i, e, k = 33, 1024, 256, 8, 2
  w13 = random_experts(rng, e, 2 * i, h, scale_range=(2.0**-9, 2.0**-6), gs=1.0)
  w2 = random_experts(rng, e, h, i, scale_range=(2.0**-9, 2.0**-6), gs=1.0)
  x = jnp.asarray(rng.standard_normal((m, h)) * 64, jnp.bfloat16)
  tw, ti = _distinct_topk(rng, m, e, k)
  _check(x, w13, w2, _fused(x, w13, w2, topk_weights=tw, topk_ids=ti), tw, ti)


def test_primitive_contract_hand_schedule(rng):
  """Every rule of the contract through the kernel, with poisoned output memory."""
  from tests.test_moe import _contract_numpy
  e, n, k, bm = 3, 300, 1024, 8
  w = random_experts(rng, e, n, k)
  rows_out, gd = 20, 2
  x = jnp.asarray(rng.standard_normal((10, k)), jnp.bfloat16)
  sids = np.full(48, 99, np.int32)
  sids[0:5] = [0, 7, 3, 19, 25]
  sids[8:11] = [1, 2, 4]
  sids[16:20] = [5, 6, 8, 9]
  sids[24:26] = [10, 11]
  sids[32:34] = [12, 13]
  block_expert = np.array([2, -1, 0, 1, 1, -1], np.int32)
  tw = rng.uniform(0.1, 1, rows_out).astype(np.float32)
  bias = rng.standard_normal((e, n)).astype(np.float32)
  p = nf.prepare(w)
  al = nf.Alignment(jnp.asarray(sids), jnp.asarray(block_expert), jnp.array([32], jnp.int32),
                    block_m=bm, num_pairs=rows_out)
  written = [0, 7, 3, 19, 5, 6, 8, 9, 10, 11]
  untouched = np.setdiff1d(np.arange(rows_out), written)
  for weights, b in ((None, None), (tw, bias)):
    f = jax.jit(lambda xx: nf.nvfp4_moe_gemm(xx, p, al, gather_div=gd, num_rows_out=rows_out,
                                             topk_weights=weights, bias=b))
    out = np.asarray(poisoned(f, x, out_shape=(rows_out, n), dtype=jnp.bfloat16))
    assert not out[untouched].any() and np.isfinite(out).all()
    want = _contract_numpy(x, w, sids, block_expert, 32, weights, b, gather_div=gd,
                           num_rows_out=rows_out, block_m=bm)
    assert ref.rel_l2(out[written], want[written]) <= 4e-3


@pytest.mark.parametrize("m, e, k, block_m", [(1, 256, 8, 8), (4096, 256, 8, 64),
                                              (123, 12, 3, 16)])
def test_alignment_on_gpu(rng, m, e, k, block_m):
  ids = _distinct_topk(rng, m, e, k)[1]
  al = jax.jit(nf.align_tokens, static_argnums=(1, 2))(jnp.asarray(ids), e, block_m)
  ref.check_alignment(al.sorted_ids, al.block_expert, al.num_padded, ids, e, block_m)


def _align_ids(rng, kind, m, e, k):
  if kind == "distinct":
    return _distinct_topk(rng, m, e, k)[1]
  if kind == "dropped":                       # ids outside [0, E) on about a fifth of the pairs
    return rng.integers(-3, e + 3, (m, k)).astype(np.int32)
  if kind == "one_expert":                    # one long run: the per-expert cursor crosses chunks
    return np.full((m, k), e - 1, np.int32)
  return rng.integers(0, e, (m, k)).astype(np.int32)  # "repeats": duplicates within a token


@pytest.mark.parametrize("kind, m, e, k, block_m, mapped", [
    ("distinct", 1, 256, 8, 8, False), ("distinct", 1, 128, 8, 8, True),
    ("distinct", 7, 12, 3, 16, False), ("dropped", 333, 5, 3, 32, True),
    ("repeats", 4096, 256, 8, 64, False), ("repeats", 4096, 256, 8, 64, True),
    ("one_expert", 3000, 2, 1, 64, False), ("repeats", 1000, 1, 3, 8, False),
    ("repeats", 50, 1024, 6, 16, True), ("repeats", 200, 1024, 6, 32, True),
    ("distinct", 1025, 64, 4, 32, False), ("dropped", 1111, 40, 3, 16, False),
    ("repeats", 600, 1024, 6, 16, True), ("distinct", 9000, 128, 8, 64, True),
    ("dropped", 0, 4, 2, 8, False)])
def test_alignment_kernel_matches_reference_bitwise(rng, kind, m, e, k, block_m, mapped):
  """The CUDA alignment against the pure-JAX one (same GPU), bit for bit, and against the NumPy
  invariants, with poisoned output memory. Pair counts from 0 to 72000: one block (<= 1024
  pairs) and the two-launch grid (3, 4, 5 blocks with a short last one, 32, and 64 blocks of
  more than 1024 pairs each)."""
  ids = jnp.asarray(_align_ids(rng, kind, m, e, k))
  emap = None
  if mapped:
    local = rng.permutation(e)[: e // 2]
    emap = np.full(e, -1, np.int32)
    emap[local] = np.arange(len(local))
    emap = jnp.asarray(emap)
  def run(backend):
    al = jax.jit(lambda i, mp: nf.align_tokens(i, e, block_m, mp, backend=backend))(ids, emap)
    return al.sorted_ids, al.block_expert, al.num_padded
  p = capacity(m * k, e, block_m)
  got = poisoned(run, "cuda", out_shape=(max(p, 1),), dtype=jnp.int32)
  want = run("reference")
  for g, w in zip(got, want):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
  ref.check_alignment(*got, np.asarray(ids), e, block_m, emap)


def test_alignment_handler_checks_its_scratch(rng):
  """More than 1024 pairs need a [blocks, E] int32 scratch result: the handler refuses a short
  one (the primitive's lowering always sizes it; the target is called directly here)."""
  e, pairs = 16, 4096
  ids = jnp.asarray(rng.integers(0, e, (pairs // 4, 4)).astype(np.int32))
  p = capacity(pairs, e, 8)
  def call(scratch_len):
    out = (jax.ShapeDtypeStruct((p,), jnp.int32), jax.ShapeDtypeStruct((p // 8,), jnp.int32),
           jax.ShapeDtypeStruct((1,), jnp.int32), jax.ShapeDtypeStruct((scratch_len,), jnp.int32))
    f = jax.ffi.ffi_call(moe_align.CUDA_TARGET, out)
    return jax.jit(lambda i: f(i, jnp.zeros((0,), jnp.int32), num_experts=np.int64(e),
                               block_m=np.int64(8))[:3])(ids)
  blocks = moe_align.align_grid(pairs)
  assert blocks == 4
  got = call(blocks * e)
  ref.check_alignment(*got, np.asarray(ids), e, 8)
  with pytest.raises(Exception, match="scratch result needs 64 int32"):
    jax.block_until_ready(call(blocks * e - 1))


def test_alignment_kernel_expert_limit(rng):
  ids = jnp.asarray(rng.integers(0, 2000, (3, 4)).astype(np.int32))
  e = moe_align.ALIGN_MAX_EXPERTS + 1
  auto = nf.align_tokens(ids, e, 8)                         # falls back to the reference
  ref.check_alignment(auto.sorted_ids, auto.block_expert, auto.num_padded, np.asarray(ids), e, 8)
  with pytest.raises(ValueError, match="at most"):
    jax.jit(lambda i: nf.align_tokens(i, e, 8, backend="cuda").sorted_ids)(ids)


def test_gemm_without_zeroing_writes_the_contract_rows(rng):
  """zero_unwritten=False (what fused_moe asks): the rows blocks write are the contract's."""
  from tests.test_moe import _contract_numpy
  e, n, k, bm = 3, 200, 512, 8
  w = random_experts(rng, e, n, k)
  x = jnp.asarray(rng.standard_normal((12, k)), jnp.bfloat16)
  sids = np.full(24, 12, np.int32)
  sids[0:3], sids[8:13] = [4, 0, 9], [1, 2, 3, 11, 7]
  block_expert = np.array([1, 2, -1], np.int32)
  al = nf.Alignment(jnp.asarray(sids), jnp.asarray(block_expert), jnp.array([16], jnp.int32),
                    block_m=bm, num_pairs=12)
  p = nf.prepare(w)
  f = jax.jit(lambda xx: nf.nvfp4_moe_gemm(xx, p, al, gather_div=1, num_rows_out=12,
                                           zero_unwritten=False))
  out = np.asarray(poisoned(f, x, out_shape=(12, n), dtype=jnp.bfloat16), np.float64)
  written = [4, 0, 9, 1, 2, 3, 11, 7]
  want = _contract_numpy(x, w, sids, block_expert, 16, None, None, gather_div=1,
                         num_rows_out=12, block_m=bm)
  assert np.isfinite(out[written]).all()
  assert ref.rel_l2(out[written], want[written]) <= 4e-3


def test_vmap_over_sequences(rng):
  x, w13, w2 = _layer(rng, 96, 1024, 512, 8)
  tw, ti = _distinct_topk(rng, 96, 8, 2)
  p13, p2 = nf.prepare(w13, gate_up_pairs=True), nf.prepare(w2)
  f = jax.jit(lambda xx, w, i: nf.fused_moe(xx, p13, p2, topk_weights=w, topk_ids=i))
  out = jax.jit(jax.vmap(f))(x.reshape(3, 32, 1024), tw.reshape(3, 32, 2), ti.reshape(3, 32, 2))
  for b in range(3):
    s = slice(32 * b, 32 * b + 32)
    np.testing.assert_array_equal(np.asarray(out[b]), np.asarray(f(x[s], tw[s], ti[s])))


# ----------------------------------------------------------------------------- one handler

@pytest.mark.parametrize("m, h, i, e, k, activation", [
    (1, 2048, 768, 128, 8, "swiglu"),      # Qwen3-like decode: k-sliced GEMM 1, unsliced GEMM 2
    (1, 4096, 2048, 8, 2, "relu2"),        # two token tiles, both GEMMs k-sliced
    (4, 1040, 1008, 16, 4, "gptoss"),      # K not a multiple of 64, short x tiles
    (16, 2048, 512, 64, 6, "swiglu"),      # unsliced, several N blocks per block
    (300, 1024, 768, 12, 3, "relu2"),      # prefill tiles, split K
])
def test_pair_handler_is_bitwise_the_two_gemms(rng, monkeypatch, m, h, i, e, k, activation):
  """jax_nvfp4_moe_pair_cuda (both GEMMs from one handler, GEMM 2 under programmatic
  dependent launch) against the two grouped-GEMM calls, bit for bit, with the layer's output
  poisoned before the call; and the layer against float64."""
  from jax_nvfp4.ops import moe_pair
  # The grouped GEMM is built (the module's fixture): a build without the pair is stale.
  assert moe_pair.CUDA_TARGET in moe_ops._ffi.REGISTERED, "stale build: rebuild jax_nvfp4"
  gated = activation != "relu2"
  x, w13, w2 = _layer(rng, m, h, i, e, gated=gated)
  tw, ti = _distinct_topk(rng, m, e, k)
  b13 = jnp.asarray(rng.standard_normal((e, w13.shape[1])) * 0.5, jnp.float32)
  b2 = jnp.asarray(rng.standard_normal((e, h)) * 0.1, jnp.float32)
  p13, p2 = nf.prepare(w13, gate_up_pairs=gated), nf.prepare(w2)
  limit = 7.0 if activation == "gptoss" else None
  alpha = 1.0 if activation == "gptoss" else 1.702  # gptoss: not the default, so it must arrive
  out = {}
  for on in ("0", "1"):
    monkeypatch.setenv(moe_pair.ENV, on)
    f = jax.jit(lambda *a: nf.fused_moe(*a[:3], topk_weights=a[3], topk_ids=a[4],
                                        activation=activation, limit=limit, alpha=alpha,
                                        w13_bias=a[5], w2_bias=a[6]))
    assert ("nvfp4_moe_pair" in str(jax.make_jaxpr(f)(x, p13, p2, tw, ti, b13, b2))) == (on == "1")
    out[on] = np.asarray(poisoned(f, x, p13, p2, tw, ti, b13, b2, out_shape=(m * k, h),
                                  dtype=jnp.bfloat16))
  np.testing.assert_array_equal(out["1"], out["0"])
  _check(x, w13, w2, out["1"], tw, ti, activation_kind=activation, limit=limit, alpha=alpha,
         b13=np.asarray(b13, np.float64), b2=np.asarray(b2, np.float64), gemm1_rounded=False)
  # Repeated calls: the same bits (the two launches are ordered by the wait, not by chance).
  for _ in range(3):
    np.testing.assert_array_equal(np.asarray(f(x, p13, p2, tw, ti, b13, b2)), out["1"])


@pytest.mark.parametrize("block_m", [8, 16, 64])
def test_pair_handler_skips_dropped_pairs_and_zeroes_their_rows(rng, block_m):
  """The pair called directly with zero_unwritten=True on an expert-parallel shard: ids out of
  range and experts held elsewhere (block expert -1) are rows of zeros; every other row is the
  two grouped-GEMM calls' row, bit for bit; their sum over k is the float64 layer's."""
  from jax_nvfp4.ops import moe_pair
  m, h, i, e_local, k = 37, 1040, 1008, 5, 3
  x, w13, w2 = _layer(rng, m, h, i, e_local)
  tw, ti = _distinct_topk(rng, m, 7, k)                     # global ids 0..6; 6 is out of range
  emap = np.array([0, 1, -1, 2, 3, 4], np.int32)            # global 2 is held elsewhere
  p13, p2 = nf.prepare(w13, gate_up_pairs=True), nf.prepare(w2)
  al = nf.align_tokens(jnp.asarray(ti), 6, block_m, jnp.asarray(emap))
  rows, tw_flat = m * k, jnp.asarray(tw.reshape(-1), jnp.float32)
  pair = jax.jit(lambda a: moe_pair.nvfp4_moe_pair(a, p13, p2, al, top_k=k, topk_weights=tw_flat,
                                                   activation="swiglu", zero_unwritten=True))
  got = np.asarray(poisoned(pair, x, out_shape=(rows, h), dtype=jnp.bfloat16))

  def two(a):
    mid = nf.nvfp4_moe_gemm(a, p13, al, gather_div=k, num_rows_out=rows, zero_unwritten=False,
                            activation="swiglu")
    return nf.nvfp4_moe_gemm(mid, p2, al, gather_div=1, num_rows_out=rows, topk_weights=tw_flat)
  np.testing.assert_array_equal(got, np.asarray(jax.jit(two)(x)))
  ids = ti.reshape(-1)
  dropped = (ids >= 6) | (ids == 2)
  assert dropped.any() and (~dropped).any()
  assert not got[dropped].any()
  combined = got.astype(np.float64).reshape(m, k, h).sum(axis=1)
  want = ref.moe(np.asarray(x, np.float64), ref.dequantize_experts(w13),
                 ref.dequantize_experts(w2), tw, ti, expert_map=emap)  # id 6: no expert
  assert ref.rel_l2(combined, want) <= TOL[jnp.bfloat16]


def test_every_gpu_of_the_process_runs_the_grouped_gemm(rng):
  """As tests/test_dense_gpu.py's test for the dense kernel: the grouped GEMM (and the pair)
  launch on a second GPU of the process, bit for bit the first's."""
  gpus = jax.devices("gpu")
  if len(gpus) < 2:
    pytest.skip("needs two GPUs in this process")
  m, h, i, e, k = 4, 2048, 768, 16, 4
  x, w13, w2 = _layer(rng, m, h, i, e)
  tw, ti = _distinct_topk(rng, m, e, k)
  p13, p2 = nf.prepare(w13, gate_up_pairs=True), nf.prepare(w2)
  outs = []
  for gpu in gpus[:2]:
    args = jax.device_put((x, p13, p2, tw, ti), gpu)
    out = jax.jit(lambda a, b, c, d, f: nf.fused_moe(a, b, c, topk_weights=d, topk_ids=f))(*args)
    assert out.devices() == {gpu}
    outs.append(np.asarray(out))
  np.testing.assert_array_equal(outs[1], outs[0])
  _check(x, w13, w2, outs[1], tw, ti, gemm1_rounded=False)


@pytest.mark.parametrize("pairs", [True, False])
def test_a_batch_beyond_one_launch_runs_in_token_chunks_on_the_kernel(rng, monkeypatch, pairs):
  """The kernel path of a batch split into token chunks (one launch's token tiles patched down
  to 40: 300 tokens at top-2 over 12 experts, block_m 8, align to ceil((2t + 12 * 7) / 8)
  tiles, so they run as chunks of 118, 118 and 64), poisoned, against the float64 layer."""
  monkeypatch.setattr(moe_ops, "MAX_TOKEN_TILES", 40)
  m, h, i, e, k = 300, 256, 320, 12, 2
  assert moe_ops.tokens_per_launch(m, k, e, 8) == 118
  x, w13, w2 = _layer(rng, m, h, i, e)
  tw, ti = _distinct_topk(rng, m, e, k)
  # A jit of its own: traced under the patched limit, whatever other tests traced before.
  layer = jax.jit(lambda *a: nf.fused_moe(*a[:3], topk_weights=a[3], topk_ids=a[4], block_m=8))
  out = poisoned(layer, x, nf.prepare(w13, gate_up_pairs=pairs), nf.prepare(w2), tw, ti,
                 out_shape=(m, h), dtype=jnp.bfloat16)
  _check(x, w13, w2, out, tw, ti, gemm1_rounded=not pairs)
