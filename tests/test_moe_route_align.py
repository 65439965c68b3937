"""route_and_align (routing + token alignment, one CUDA launch at decode) against the float64
NumPy routing and the alignment's invariants. The tests without the gpu mark run on any backend
(on a GPU they go through the kernel); the gpu ones compare the kernel with the XLA reference
on the same device."""

import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_nvfp4 as nf
from jax_nvfp4.bench.common import gpu_events
from jax_nvfp4.moe import capacity
from jax_nvfp4.ops import moe_align, moe_route
from tests import numpy_moe_reference as ref

# (name, E, RoutingConfig kwargs): the routing rules of the checkpoints fused_moe serves.
CONFIGS = {
    "qwen3": (128, dict(top_k=8)),
    "mixtral": (8, dict(top_k=2)),
    "softmax_plain": (60, dict(top_k=4, renormalize=False)),
    "deepseek": (256, dict(top_k=8, scoring="sigmoid", n_group=8, topk_group=4,
                           routed_scaling_factor=2.5)),
    "grouped_max": (64, dict(top_k=6, scoring="sigmoid", n_group=16, topk_group=3,
                             group_score="max", renormalize=False)),
    "sigmoid_flat": (40, dict(top_k=3, scoring="sigmoid", routed_scaling_factor=0.5)),
}


def _config(rng, name, with_bias=True):
  e, kw = CONFIGS[name]
  bias = None
  if with_bias and kw.get("scoring") == "sigmoid":
    bias = jnp.asarray(rng.uniform(-0.3, 0.3, e).astype(np.float32))
  return e, nf.RoutingConfig(correction_bias=bias, **kw)


def _numpy_route(logits, cfg):
  bias = None if cfg.correction_bias is None else np.asarray(cfg.correction_bias)
  return ref.route(np.asarray(logits, np.float64), cfg.top_k, scoring=cfg.scoring,
                   renormalize=cfg.renormalize, n_group=cfg.n_group, topk_group=cfg.topk_group,
                   group_score=cfg.group_score, routed_scaling_factor=cfg.routed_scaling_factor,
                   correction_bias=bias)


def _poison_device_memory(*shapes_dtypes):
  """Frees device memory filled with a pattern that no output holds (NaN, 0xdeadbeef), so
  that an output element the kernel forgets to write shows up."""
  for shape, dtype in shapes_dtypes:
    fill = jnp.nan if jnp.issubdtype(dtype, jnp.floating) else -559038737
    jnp.full(shape, fill, dtype).block_until_ready()


def _poison_outputs(logits, cfg, block_m=None):
  """_poison_device_memory for every output of route_and_align on these logits."""
  m, e = logits.shape
  k = cfg.top_k
  bm = block_m or nf.choose_block_m(m, k, e)
  p = capacity(m * k, e, bm)
  _poison_device_memory(((m, k), jnp.float32), ((m, k), jnp.int32), ((p,), jnp.int32),
                        ((p // bm,), jnp.int32))


def _run(logits, cfg, block_m=None, expert_map=None, backend="auto"):
  _poison_outputs(logits, cfg, block_m)
  f = jax.jit(nf.route_and_align, static_argnames=("block_m", "backend"))
  return f(logits, cfg, block_m=block_m, expert_map=expert_map, backend=backend)


def _check(logits, cfg, got, expert_map=None):
  w, ids, al = got
  m, e = logits.shape
  assert w.dtype == jnp.float32 and ids.dtype == jnp.int32 and w.shape == ids.shape == (
      m, cfg.top_k)
  rw, rids = _numpy_route(np.asarray(logits.astype(jnp.float32)), cfg)
  np.testing.assert_array_equal(np.asarray(ids), rids)
  np.testing.assert_allclose(np.asarray(w), rw, rtol=2e-6, atol=1e-7)
  ref.check_alignment(al.sorted_ids, al.block_expert, al.num_padded, np.asarray(ids), e,
                      al.block_m, expert_map)
  # And bit for bit the alignment of those ids.
  want = nf.align_tokens(ids, e, al.block_m, expert_map, backend="reference")
  for a, b in ((al.sorted_ids, want.sorted_ids), (al.block_expert, want.block_expert),
               (al.num_padded, want.num_padded)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("m", [1, 3, 16, 127])
def test_matches_numpy(rng, name, m):
  e, cfg = _config(rng, name)
  logits = jnp.asarray(rng.standard_normal((m, e)).astype(np.float32) * 2)
  _check(logits, cfg, _run(logits, cfg))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("name", ["qwen3", "deepseek"])
def test_half_precision_logits(rng, name, dtype):
  e, cfg = _config(rng, name)
  logits = jnp.asarray(rng.standard_normal((5, e)) * 2, dtype)
  _check(logits, cfg, _run(logits, cfg))


@pytest.mark.parametrize("block_m", [8, 16, 32, 64])
def test_expert_map_and_block_m(rng, block_m):
  e, cfg = _config(rng, "deepseek")
  emap = np.where(np.arange(e) % 3 == 0, -1, np.arange(e) // 2).astype(np.int32)
  logits = jnp.asarray(rng.standard_normal((9, e)).astype(np.float32))
  _check(logits, cfg, _run(logits, cfg, block_m, jnp.asarray(emap)), emap)


def test_ties_take_the_lower_index():
  """Equal logits: the k lowest ids, in order, equal weights; equal groups: the lower groups."""
  logits = jnp.zeros((2, 16), jnp.float32)
  w, ids, _ = _run(logits, nf.RoutingConfig(top_k=4))
  np.testing.assert_array_equal(np.asarray(ids), [[0, 1, 2, 3]] * 2)
  np.testing.assert_array_equal(np.asarray(w), np.full((2, 4), 0.25, np.float32))
  cfg = nf.RoutingConfig(top_k=3, scoring="sigmoid", n_group=4, topk_group=2)
  logits = jnp.asarray(np.tile([0.0, 1.0, 0.0, 1.0], 4).astype(np.float32)[None])  # groups tie
  _, ids, _ = _run(logits, cfg)
  np.testing.assert_array_equal(np.asarray(ids), [[1, 3, 5]])


def test_hand_computed_case():
  """Two tokens, E = 4, top-2 softmax: ids by logit, weights the softmax of the two, and the
  alignment laid out by hand."""
  logits = jnp.asarray([[0.0, 3.0, 1.0, -2.0], [2.0, 0.0, 0.0, 2.5]], jnp.float32)
  w, ids, al = _run(logits, nf.RoutingConfig(top_k=2), block_m=8)
  np.testing.assert_array_equal(np.asarray(ids), [[1, 2], [3, 0]])
  e1, e2 = 1 / (1 + np.exp(-2.0)), 1 / (1 + np.exp(-0.5))
  np.testing.assert_allclose(np.asarray(w), [[e1, 1 - e1], [e2, 1 - e2]], rtol=1e-6)
  s = 4  # pairs: 0->1 1->2 2->3 3->0
  np.testing.assert_array_equal(np.asarray(al.sorted_ids)[:32],
                                [3] + [s] * 7 + [0] + [s] * 7 + [1] + [s] * 7 + [2] + [s] * 7)
  np.testing.assert_array_equal(np.asarray(al.block_expert)[:4], [0, 1, 2, 3])
  assert int(al.num_padded[0]) == 32


def test_leading_dims_and_defaults(rng):
  logits = jnp.asarray(rng.standard_normal((2, 3, 32)).astype(np.float32))
  w, ids, al = nf.route_and_align(logits, nf.RoutingConfig(top_k=4))
  assert w.shape == ids.shape == (2, 3, 4) and al.block_m == nf.choose_block_m(6, 4, 32)
  assert al.num_pairs == 24
  rw, rids = nf.route(logits, nf.RoutingConfig(top_k=4))
  np.testing.assert_array_equal(np.asarray(ids), np.asarray(rids))


def test_m_zero():
  w, ids, al = _run(jnp.zeros((0, 16), jnp.float32), nf.RoutingConfig(top_k=2), block_m=8)
  assert w.shape == ids.shape == (0, 2) and al.sorted_ids.shape == (0,)
  assert int(al.num_padded[0]) == 0


def test_vmap_routes_each_element(rng):
  logits = jnp.asarray(rng.standard_normal((3, 4, 24)).astype(np.float32))
  cfg = nf.RoutingConfig(top_k=3)
  f = lambda l: nf.route_and_align(l, cfg, 8)
  bw, bids, bal = jax.vmap(f)(logits)
  for b in range(3):
    w, ids, al = f(logits[b])
    np.testing.assert_array_equal(np.asarray(bids[b]), np.asarray(ids))
    np.testing.assert_array_equal(np.asarray(bw[b]), np.asarray(w))
    np.testing.assert_array_equal(np.asarray(bal.sorted_ids[b]), np.asarray(al.sorted_ids))


def test_bad_inputs_raise():
  cfg = nf.RoutingConfig(top_k=2)
  with pytest.raises(TypeError, match="floating"):
    nf.route_and_align(jnp.zeros((2, 4), jnp.int32), cfg)
  with pytest.raises(TypeError, match="RoutingConfig"):
    nf.route_and_align(jnp.zeros((2, 4)), {"top_k": 2})
  with pytest.raises(ValueError, match="exceeds"):
    nf.route_and_align(jnp.zeros((2, 4)), nf.RoutingConfig(top_k=5))
  with pytest.raises(ValueError, match="block_m"):
    nf.route_and_align(jnp.zeros((2, 4)), cfg, 12)
  with pytest.raises(ValueError, match="expert_map"):
    nf.route_and_align(jnp.zeros((2, 4)), cfg, 8, jnp.zeros(3, jnp.int32))
  with pytest.raises(ValueError, match="backend must be"):
    nf.route_and_align(jnp.zeros((2, 4)), cfg, backend="kernel")
  with pytest.raises(TypeError, match="correction_bias must be float32"):
    moe_route.moe_route_align_p.bind(
        jnp.zeros((2, 4)), jnp.zeros((4,), jnp.float16), jnp.zeros((0,), jnp.int32), top_k=2,
        scoring="softmax", renormalize=True, n_group=1, topk_group=1, group_score="top2_sum",
        routed_scaling_factor=1.0, block_m=8, backend="auto")
  if jax.default_backend() != "gpu":
    with pytest.raises(ValueError, match="cannot lower"):
      jax.jit(lambda l: nf.route_and_align(l, cfg, backend="cuda")[0])(jnp.zeros((2, 4)))


# ----------------------------------------------------------------------------- lowering

def _export_calls(m, e, cfg, monkeypatch, backend="auto", fn=None):
  targets = {moe_route.CUDA_TARGET, moe_align.CUDA_TARGET}
  monkeypatch.setattr(nf._ffi, "REGISTERED", nf._ffi.REGISTERED | targets)
  fn = fn or (lambda l: nf.route_and_align(l, cfg, 8, backend=backend))
  exp = jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=[
      jax.export.DisabledSafetyCheck.custom_call(t) for t in targets])(
          jax.ShapeDtypeStruct((m, e), jnp.bfloat16))
  text = exp.mlir_module()
  return ([l for l in text.split("\n") if "stablehlo.custom_call" in l or "mhlo.sort" in l
           or "stablehlo.sort" in l])


def test_cuda_lowering_is_one_launch_at_decode(monkeypatch):
  """Lowered for cuda (no GPU needed): a decode batch is one custom call with the handler's
  operands, results and attributes, and no sort; beyond 1024 pairs XLA routes (a sort) and
  the alignment kernel aligns."""
  cfg = nf.RoutingConfig.deepseek_v3(8, n_group=8, topk_group=4, routed_scaling_factor=2.5,
                                     correction_bias=jnp.zeros(256))
  calls = _export_calls(128, 256, cfg, monkeypatch)
  assert len(calls) == 1 and f"@{moe_route.CUDA_TARGET}" in calls[0], calls
  p = capacity(1024, 256, 8)
  assert ("(tensor<128x256xbf16>, tensor<256xf32>, tensor<0xi32>) -> (tensor<128x8xf32>, "
          f"tensor<128x8xi32>, tensor<{p}xi32>, tensor<{p // 8}xi32>, tensor<1xi32>)") in calls[0]
  for attr in ("top_k = 8 : i64", "sigmoid = 1 : i64", "n_group = 8 : i64",
               "topk_group = 4 : i64", "group_max = 0 : i64", "renormalize = 1 : i64",
               "routed_scaling_factor = 2.500000e+00 : f32", "block_m = 8 : i64"):
    assert attr in calls[0], attr
  calls = _export_calls(129, 256, cfg, monkeypatch)
  assert not any(moe_route.CUDA_TARGET in c for c in calls)
  assert any(moe_align.CUDA_TARGET in c for c in calls) and any("sort" in c for c in calls)
  calls = _export_calls(4, 256, cfg, monkeypatch, backend="reference")
  assert not any("custom_call" in c for c in calls)
  # Past one block's limits on top_k (32), n_group (32) and E (1024): XLA routing again.
  for m, e, wide in ((2, 64, nf.RoutingConfig(top_k=33)),
                     (2, 128, nf.RoutingConfig(top_k=4, n_group=64, topk_group=2)),
                     (1, 1025, nf.RoutingConfig(top_k=2))):
    assert not moe_route.fits_one_block(m, e, wide.top_k, wide.n_group)
    calls = _export_calls(m, e, wide, monkeypatch)
    assert not any(moe_route.CUDA_TARGET in c for c in calls) and any("sort" in c for c in calls)
  assert moe_route.fits_one_block(32, 1024, 32, 32)


# ----------------------------------------------------------------------------- GPU only

@pytest.mark.gpu
@pytest.mark.parametrize("name", list(CONFIGS))
def test_kernel_against_xla_reference_on_gpu(rng, name):
  """The kernel and the XLA reference on the same GPU: equal ids and alignments, weights to
  float32 rounding, across the single-block range (1 to 1024 pairs)."""
  e, cfg = _config(rng, name)
  for m in (1, 2, 7, 64, 1024 // cfg.top_k):
    logits = jnp.asarray(rng.standard_normal((m, e)).astype(np.float32) * 3)
    assert moe_route.fits_one_block(m, e, cfg.top_k, cfg.n_group)
    w, ids, al = _run(logits, cfg)
    want_w, want_ids, ral = _run(logits, cfg, backend="reference")
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(want_ids))
    np.testing.assert_allclose(np.asarray(w), np.asarray(want_w), rtol=1e-6, atol=1e-8)
    for a, b in ((al.sorted_ids, ral.sorted_ids), (al.block_expert, ral.block_expert),
                 (al.num_padded, ral.num_padded)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.gpu
def test_kernel_is_deterministic_and_many_experts(rng):
  """1024 experts (the kernel's limit, fewer warps to fit shared memory) and repeated runs give
  the same bits."""
  cfg = nf.RoutingConfig(top_k=32)
  logits = jnp.asarray(rng.standard_normal((32, 1024)).astype(np.float32))
  first = _run(logits, cfg)
  _check(logits, cfg, first)
  for _ in range(3):
    again = _run(logits, cfg)
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(again)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.gpu
def test_handler_rejects_more_pairs_than_one_block(rng):
  """The target called directly with 1025 pairs: a clear error, not a wrong result."""
  m, e, k = 205, 16, 5
  p = capacity(m * k, e, 8)
  out = (jax.ShapeDtypeStruct((m, k), jnp.float32), jax.ShapeDtypeStruct((m, k), jnp.int32),
         jax.ShapeDtypeStruct((p,), jnp.int32), jax.ShapeDtypeStruct((p // 8,), jnp.int32),
         jax.ShapeDtypeStruct((1,), jnp.int32))
  f = jax.ffi.ffi_call(moe_route.CUDA_TARGET, out)
  call = jax.jit(lambda l: f(l, jnp.zeros((0,), jnp.float32), jnp.zeros((0,), jnp.int32),
                             top_k=np.int64(k), sigmoid=np.int64(0), renormalize=np.int64(1),
                             n_group=np.int64(1), topk_group=np.int64(1),
                             group_max=np.int64(0), routed_scaling_factor=np.float32(1.0),
                             block_m=np.int64(8)))
  with pytest.raises(Exception, match="more than one block's 1024"):
    jax.block_until_ready(call(jnp.zeros((m, e), jnp.float32)))


def _assert_same_bits(got, want):
  """Every output of two route_and_align calls (weights, ids, alignment) equal bit for bit."""
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _route_kernels(f, args) -> set[str]:
  """The routing kernels (demangled names) one call of f ran, from the profiler."""
  jax.block_until_ready(f(*args))
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, create_perfetto_trace=True):
      jax.block_until_ready(f(*args))
    return {e["name"] for e in gpu_events(d) if "moe_route" in e["name"]}


# The handler's kernel switches (read when it issues the launch) for each routing kernel, and
# the part of the kernel's demangled name that the profiler shows for it.
KERNEL_SETTINGS = {
    "decode": ({"JAX_NVFP4_ROUTE_WIDE": "0"}, "small_kernel"),
    "wide": ({"JAX_NVFP4_ROUTE_WIDE": "1"}, "align_wide_kernel"),
    "general": ({"JAX_NVFP4_ROUTE_SMALL": "0", "JAX_NVFP4_ROUTE_WIDE": "0"}, None),
}


def _run_kernel(monkeypatch, kernel, logits, cfg, block_m=None, expert_map=None, names=False):
  """route_and_align under `kernel`'s switches, through a function compiled for this call
  alone (an executable shared with an earlier setting could replay that setting's launch from
  its command buffer), into poisoned device memory. With ``names``, the profiler shows that
  the call ran that kernel (general: neither decode kernel)."""
  env, name = KERNEL_SETTINGS[kernel]
  _poison_outputs(logits, cfg, block_m)
  with monkeypatch.context() as mp:
    for var, value in env.items():
      mp.setenv(var, value)
    f = jax.jit(lambda l, em: nf.route_and_align(l, cfg, block_m=block_m, expert_map=em))
    args = (logits, expert_map)
    got = f(*args)
    if names:
      ran = _route_kernels(f, args)
      if name is None:
        assert ran and not any("small_kernel" in n or "wide_kernel" in n for n in ran), ran
      else:
        assert any(name in n for n in ran), (kernel, ran)
  return got


def _same_as_general(monkeypatch, kernel, logits, cfg, block_m=None, expert_map=None,
                     names=False):
  """The call through `kernel` and through the general kernel: the same bits in every output
  (weights, ids, alignment). Returns `kernel`'s outputs."""
  got = _run_kernel(monkeypatch, kernel, logits, cfg, block_m, expert_map, names)
  general = _run_kernel(monkeypatch, "general", logits, cfg, block_m, expert_map, names)
  _assert_same_bits(got, general)
  return got


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(CONFIGS))
def test_decode_kernel_matches_the_general_kernel(rng, name, monkeypatch):
  """Up to 32 tokens, 128 pairs and 256 experts the handler runs the decode kernel (keys in
  registers, one warp aligns); JAX_NVFP4_ROUTE_SMALL=0 sends the same call to the general
  kernel. Both give the same bits (the same arithmetic in the same order), and the ids and
  alignment equal the XLA reference's, at and past the decode kernel's last batch, with bf16
  logits."""
  e, cfg = _config(rng, name)
  k = cfg.top_k
  last = min(32, 128 // k)   # the decode kernel's most tokens at this top_k
  for m in sorted({1, 2, 32 // k, last, last + 1}):
    for dtype in (jnp.float32, jnp.bfloat16):
      logits = jnp.asarray(rng.standard_normal((m, e)) * 3, dtype)
      _check(logits, cfg, _same_as_general(monkeypatch, "decode", logits, cfg,
                                           names=m == 1 and dtype == jnp.float32))


@pytest.mark.gpu
@pytest.mark.parametrize("e", [1, 31, 33, 64, 65, 200, 256, 257])
def test_decode_kernel_expert_counts(rng, e, monkeypatch):
  """Every register width of the decode kernel (1, 2, 4, 8 keys per lane) at its edges, and
  the first count past it (257 runs the general kernel): the reference's ids, both kernels'
  bits, and the ties of a constant row (the lowest ids)."""
  cfg = nf.RoutingConfig(top_k=min(4, e), renormalize=e % 2 == 0)
  for logits in (jnp.asarray(rng.standard_normal((3, e)).astype(np.float32)),
                 jnp.zeros((1, e), jnp.float32)):
    decode = _same_as_general(monkeypatch, "decode" if e <= 256 else "general", logits, cfg,
                              names=e in (1, 257))
    _check(logits, cfg, decode)
  np.testing.assert_array_equal(np.asarray(decode[1]), [np.arange(min(4, e))])


@pytest.mark.gpu
@pytest.mark.parametrize("block_m", [8, 16, 32, 64])
@pytest.mark.parametrize("m", [1, 4, 16])
def test_decode_kernel_expert_map(rng, block_m, m, monkeypatch):
  """The decode kernel's alignment under an expert map with -1 entries (a block's expert is
  the mapped id, -1 blocks stay in the schedule) and every block_m, against the general kernel
  and the reference; m = 4 and 16 fill one and four of the alignment's 32-pair chunks (16 is
  the decode kernel's most at top-8)."""
  e, cfg = _config(rng, "deepseek")
  emap = np.where(np.arange(e) % 3 == 0, -1, np.arange(e) // 2).astype(np.int32)
  logits = jnp.asarray(rng.standard_normal((m, e)).astype(np.float32))
  decode = _same_as_general(monkeypatch, "decode", logits, cfg, block_m, jnp.asarray(emap))
  _check(logits, cfg, decode, emap)


# ----------------------------------------------------------------------------- the wide kernel

# (E, RoutingConfig kwargs, token counts) that the wide decode kernel takes (one warp per 32
# experts of a token: at most 32 warps, at most 32 merge candidates, groups only of 32 experts):
# each at its first and last token count, 64 pairs (the chunked alignment) where one fits.
WIDE_CONFIGS = {
    "qwen3": (128, dict(top_k=8), (1, 2, 8)),
    "mixtral": (8, dict(top_k=2), (1, 5, 32)),
    "softmax_plain": (60, dict(top_k=4, renormalize=False), (1, 3, 16)),
    "deepseek": (256, dict(top_k=8, scoring="sigmoid", n_group=8, topk_group=4,
                           routed_scaling_factor=2.5), (1, 2, 4)),
    "sigmoid_flat": (40, dict(top_k=3, scoring="sigmoid", routed_scaling_factor=0.5),
                     (1, 7, 16)),
    "two_groups_max": (64, dict(top_k=8, scoring="sigmoid", n_group=2, topk_group=1,
                                group_score="max"), (1, 16)),
    "one_expert": (1, dict(top_k=1), (1, 32)),
    "seven_slices": (200, dict(top_k=4), (1, 4)),
}


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(WIDE_CONFIGS))
def test_wide_kernel_matches_the_general_kernel(rng, name, monkeypatch):
  """JAX_NVFP4_ROUTE_WIDE=1 (read at each call): every decode batch that fits it runs the
  wide kernel (a warp per 32 experts, lane ranks instead of selection rounds, a merge of the
  slices' top-k). The same arithmetic in the same order as the general kernel: the same bits,
  and the reference's ids and alignment, f32 and bf16 logits, and a constant row's ties (the
  lowest ids)."""
  e, kw, token_counts = WIDE_CONFIGS[name]
  bias = None
  if kw.get("scoring") == "sigmoid":
    bias = jnp.asarray(rng.uniform(-0.3, 0.3, e).astype(np.float32))
  cfg = nf.RoutingConfig(correction_bias=bias, **kw)
  for i, m in enumerate(token_counts):
    for dtype in (jnp.float32, jnp.bfloat16):
      logits = jnp.asarray(rng.standard_normal((m, e)) * 3, dtype)
      _check(logits, cfg, _same_as_general(monkeypatch, "wide", logits, cfg,
                                           names=i == 0 and dtype == jnp.float32))
  if bias is None:
    ties = _same_as_general(monkeypatch, "wide", jnp.zeros((2, e), jnp.float32), cfg)
    np.testing.assert_array_equal(np.asarray(ties[1]), [np.arange(cfg.top_k)] * 2)


@pytest.mark.gpu
@pytest.mark.parametrize("block_m", [8, 64])
@pytest.mark.parametrize("m", [1, 4])
def test_wide_kernel_expert_map(rng, block_m, m, monkeypatch):
  """The wide kernel under an expert map with -1 entries (every thread reads one entry) and
  the DeepSeek-like groups, against the general kernel and the reference."""
  e, cfg = _config(rng, "deepseek")
  emap = np.where(np.arange(e) % 3 == 0, -1, np.arange(e) // 2).astype(np.int32)
  logits = jnp.asarray(rng.standard_normal((m, e)).astype(np.float32))
  wide = _same_as_general(monkeypatch, "wide", logits, cfg, block_m, jnp.asarray(emap))
  _check(logits, cfg, wide, emap)


@pytest.mark.gpu
def test_default_takes_the_wide_kernel_where_it_was_measured_faster(rng, monkeypatch):
  """Without JAX_NVFP4_ROUTE_WIDE the handler takes the wide kernel only where route_lab measured
  it faster than the decode kernel (csrc/moe_route_kernels.cuh wide_route_wins: at least 4
  slices of 32 experts, one token, or up to 4 grouped ones), the decode kernel elsewhere; the
  results are the reference's either way."""
  monkeypatch.delenv("JAX_NVFP4_ROUTE_WIDE", raising=False)
  monkeypatch.delenv("JAX_NVFP4_ROUTE_SMALL", raising=False)
  wide, decode = "align_wide_kernel", "small_kernel"
  for name, m, kernel in (("deepseek", 1, wide), ("deepseek", 4, wide), ("qwen3", 1, wide),
                          ("deepseek", 5, decode), ("qwen3", 2, decode), ("mixtral", 1, decode),
                          ("softmax_plain", 1, decode)):
    e, cfg = _config(rng, name)
    logits = jnp.asarray(rng.standard_normal((m, e)).astype(np.float32))
    # A function of its own per case: an executable shared across cases could replay a
    # recorded launch.
    f = jax.jit(lambda l, cfg=cfg: nf.route_and_align(l, cfg))
    ran = _route_kernels(f, (logits,))
    assert any(kernel in n for n in ran), (name, m, ran)
    _check(logits, cfg, f(logits))


@pytest.mark.gpu
def test_wide_kernel_leaves_what_it_does_not_fit(rng, monkeypatch):
  """Groups of other than 32 experts, more than 32 warps or more than 32 merge candidates run
  the decode kernel even with JAX_NVFP4_ROUTE_WIDE=1."""
  monkeypatch.setenv("JAX_NVFP4_ROUTE_WIDE", "1")
  for e, kw, m in ((64, dict(top_k=6, scoring="sigmoid", n_group=16, topk_group=3), 1),
                   (256, dict(top_k=8), 1),     # 8 slices x 8 = 64 candidates
                   (256, dict(top_k=8, scoring="sigmoid", n_group=8, topk_group=4), 5)):
    cfg = nf.RoutingConfig(**kw)
    logits = jnp.asarray(rng.standard_normal((m, e)).astype(np.float32))
    # A function of its own per case: an executable shared across cases could replay a
    # recorded launch.
    f = jax.jit(lambda l, cfg=cfg: nf.route_and_align(l, cfg))
    args = (logits,)
    ran = _route_kernels(f, args)
    assert any("small_kernel" in n for n in ran), (e, kw, m, ran)
    _check(logits, cfg, f(*args))
