"""NVFP4 fused MoE: the grouped-GEMM primitive ``nvfp4_moe_gemm`` and the layer ``fused_moe``.

Reading order: the primitive's contract -> checks and abstract eval -> reference lowering ->
CUDA lowering -> batching -> the public ``fused_moe`` pipeline.

Contract of ``nvfp4_moe_gemm_p`` (one result; the CUDA kernel implements exactly this)::

  nvfp4_moe_gemm_p.bind(x, qweight, qscales, global_scale, sorted_ids, block_expert, num_padded,
                        topk_weights, bias, n=int, k=int, gather_div=int, num_rows_out=int,
                        block_m=int, mul_topk_weight=bool, has_bias=bool,
                        zero_unwritten=bool, backend=str, expert_rows=int,
                        activation=str, limit=float, alpha=float)

  x             bf16/fp16 [R, k]                      (R * gather_div >= num_rows_out)
  qweight       uint32 [E, ceil(n/16), ceil(k/64), 32, 4]   stacked prepare() layout
  qscales       uint8  [E, ceil(n/16), ceil(k/64), 64]
  global_scale  float32 [E]
  sorted_ids    int32 [P], P % block_m == 0
  block_expert  int32 [P // block_m]
  num_padded    int32 [1]
  topk_weights  float32 [num_rows_out] if mul_topk_weight else float32 [0]
  bias          float32 [E, n] if has_bias else float32 [0]
  -> out        x.dtype [num_rows_out, n_out]   (n_out = n // 2 for a gated activation, else n)

``out`` starts as zeros (with ``zero_unwritten=False``: as unspecified values, which saves
the kernel a memset where no unwritten row is ever read). For each block ``b`` with ``b * block_m < num_padded[0]`` and
``e = block_expert[b] >= 0``, and each slot ``r < block_m`` with
``0 <= sid = sorted_ids[b*block_m+r] < num_rows_out``::

  h = (x[sid // gather_div] @ W_e.T) * global_scale[e] + bias[e]
  out[sid] = cast(act(h) * (topk_weights[sid] if mul_topk_weight else 1))

where ``W_e`` is expert e's weight *without* its global scale (E2M1 code x block scale) and all
arithmetic is float32 up to the one final cast. A valid ``sid`` must appear at most once, and
block experts must be ``< E`` (the reference skips larger ids; the kernel may not). Rows no
block writes stay zero (an expert-parallel combine sums over devices), or, with
``zero_unwritten=False``, are unspecified (the kernel leaves the buffer as it was, the
reference writes NaN).

``activation`` (one of ``PRIMITIVE_ACTIVATIONS``, default ``"none"``: ``act(h) = h``) fuses
GEMM1's activation (``jax_nvfp4.moe.activations``, in float32): ``"relu2"`` elementwise, and the
gated ``"swiglu"`` (clamp ``limit``; ``math.inf`` for none) and ``"gptoss"`` (``limit``,
``alpha``), which read W's rows in ``gate_up_pairs`` order (``prepare(w13,
gate_up_pairs=True)``; n % 16 == 0): ``act(h)[c] = glu(h[16 (c // 8) + c % 8],
h[16 (c // 8) + 8 + c % 8])``, so the result has ``n // 2`` columns.

``expert_rows`` (>= 0, default 0 = no hint) changes no result: it tells the CUDA lowering the
most rows one expert's block is expected to hold (the token count M for top-k routing, whose
experts per token are distinct), and at 1 to 4 the decode launch holds only that many x rows
per block (a deeper weight pipeline); blocks holding more rows take more passes.

The CUDA lowering adds launch details the contract does not show: a split-K factor and whether
the splits reduce in a thread-block cluster (FFI attributes ``splits``, ``cluster``), or K split
among the warps of each block with several N tiles per block (``k_slices``,
``tiles_per_block``, at decode), and a uint8 workspace (a second FFI result that the lowering
drops).

``backend`` (one of ``LOWERINGS``) picks the lowering, never the semantics:

* ``"auto"``: the CUDA kernel (``CUDA_TARGET``) when lowering for the cuda platform with the
  kernel built, the pure-JAX reference everywhere else;
* ``"reference"``: the reference on every platform, CUDA included;
* ``"cuda"``: the kernel; lowering for another platform, or without the kernel built, raises a
  ``ValueError``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir

from jax_nvfp4 import _ffi
from jax_nvfp4.format import NVFP4Weight, check_weight, dequantize
from jax_nvfp4.moe.activations import GPTOSS_ALPHA, apply_activation, is_gated
from jax_nvfp4.moe.align import BLOCK_MS, Alignment, align_tokens, capacity, choose_block_m
from jax_nvfp4.moe.route_align import route_and_align
from jax_nvfp4.moe.routing import RoutingConfig
from jax_nvfp4.ops import dense as dense_ops
from jax_nvfp4.ops._batching import map_unless_weights_batched
from jax_nvfp4.ops.dense import CLUSTER_MAX_SPLITS, DECODE_K_SLICES, K_SLICES_MIN_K
from jax_nvfp4.ops.dequantize import reference as dequantize_blocks_reference
from jax_nvfp4.prepare import PreparedNVFP4Weight, interleave_gate_up, kernel_shapes, prepare

ACTIVATION_DTYPES = (np.dtype(jnp.bfloat16), np.dtype(jnp.float16))
CUDA_TARGET = "jax_nvfp4_moe_gemm_cuda"
#: Values of the primitive's ``backend`` parameter (see the module docstring). ``fused_moe``
#: takes ``jax_nvfp4.backend``'s names: None/"auto", "cuda", "reference".
LOWERINGS = ("auto", "cuda", "reference")
#: Values of the primitive's ``activation`` parameter, and their codes in the CUDA handler
#: (csrc/nvfp4_kernel.cuh kAct*).
ACTIVATION_CODES = {"none": 0, "swiglu": 1, "gptoss": 2, "relu2": 3}
PRIMITIVE_ACTIVATIONS = tuple(ACTIVATION_CODES)
#: The primitive's gated activations: they read gate/up row pairs and halve the columns.
GATED_ACTIVATIONS = ("swiglu", "gptoss")


# ----------------------------------------------------------------------------- checks

def _kernel_missing() -> str:
  return (f"nvfp4_moe_gemm: backend='cuda' but the grouped-GEMM kernel ({CUDA_TARGET}) is not "
          "in this build of jax_nvfp4 (" + (_ffi.why_no_kernels() or "target not registered")
          + ")")


def _fail(msg: str, exc=ValueError):
  raise exc(f"nvfp4_moe_gemm: {msg}")


def _check_operand(name, aval, dtype, shape):
  if np.dtype(aval.dtype) != np.dtype(dtype):
    _fail(f"{name} must be {np.dtype(dtype).name} {shape}, got {aval.dtype}", TypeError)
  if tuple(aval.shape) != tuple(shape):
    _fail(f"{name} must have shape {tuple(shape)}, got {tuple(aval.shape)}")


def _check_gemm(x, qweight, qscales, global_scale, sorted_ids, block_expert, num_padded,
                topk_weights, bias, *, n, k, gather_div, num_rows_out, block_m, mul_topk_weight,
                has_bias, zero_unwritten, backend, expert_rows=0, activation="none",
                limit=math.inf, alpha=GPTOSS_ALPHA):
  """Validates every operand and parameter of the contract (module docstring)."""
  if backend not in LOWERINGS:
    _fail(f"backend must be one of {LOWERINGS}, got {backend!r}")
  if activation not in ACTIVATION_CODES:
    _fail(f"activation must be one of {PRIMITIVE_ACTIVATIONS}, got {activation!r}")
  if not isinstance(limit, float) or not isinstance(alpha, float):
    _fail(f"limit and alpha must be floats, got {limit!r}, {alpha!r}", TypeError)
  if activation in GATED_ACTIVATIONS:
    if n % 16:
      _fail(f"a gated activation ({activation!r}) reads gate/up pairs of 8 rows per 16-row "
            f"tile: n must be a multiple of 16, got n = {n}")
    if not limit > 0 or (activation == "gptoss" and not math.isfinite(limit)):
      _fail(f"limit must be > 0 (math.inf: no clamp; finite for gptoss), got {limit}")
  elif limit != math.inf:
    _fail(f"activation {activation!r} clamps nothing: limit must be math.inf, got {limit}")
  if not isinstance(zero_unwritten, (bool, np.bool_)):
    _fail(f"zero_unwritten must be a bool, got {zero_unwritten!r}", TypeError)
  for pname, v in (("n", n), ("k", k), ("gather_div", gather_div),
                   ("num_rows_out", num_rows_out), ("block_m", block_m),
                   ("expert_rows", expert_rows)):
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
      _fail(f"{pname} must be an int, got {v!r}", TypeError)
  if expert_rows < 0:
    _fail(f"expert_rows must be >= 0 (0: no hint), got {expert_rows}")
  if n < 1 or k < 1 or k % 16:
    _fail(f"need n >= 1 and k >= 1 with k % 16 == 0, got n = {n}, k = {k}")
  if block_m not in BLOCK_MS:
    _fail(f"block_m must be one of {BLOCK_MS}, got {block_m}")
  if gather_div < 1 or num_rows_out < 0:
    _fail(f"need gather_div >= 1 and num_rows_out >= 0, got {gather_div}, {num_rows_out}")
  if np.dtype(x.dtype) not in ACTIVATION_DTYPES:
    _fail(f"x must be bfloat16 or float16 [R, k], got {x.dtype}", TypeError)
  if len(x.shape) != 2 or x.shape[1] != k:
    _fail(f"x must be [R, k] with k = {k}, got shape {tuple(x.shape)}")
  if x.shape[0] * gather_div < num_rows_out:
    _fail(f"x has R = {x.shape[0]} rows but num_rows_out = {num_rows_out} with gather_div = "
          f"{gather_div} reads rows up to {math.ceil(num_rows_out / gather_div) - 1}")
  if len(qweight.shape) != 5:
    _fail("qweight must be stacked uint32 [E, ceil(n/16), ceil(k/64), 32, 4] (prepare() of an "
          f"[E, n, k] weight), got shape {tuple(qweight.shape)}")
  e = qweight.shape[0]
  want_w, want_s = kernel_shapes(n, k)
  _check_operand("qweight", qweight, np.uint32, (e, *want_w))
  _check_operand("qscales", qscales, np.uint8, (e, *want_s))
  _check_operand("global_scale", global_scale, np.float32, (e,))
  if len(sorted_ids.shape) != 1:
    _fail(f"sorted_ids must be int32 [P], got shape {tuple(sorted_ids.shape)}")
  p = sorted_ids.shape[0]
  if p % block_m:
    _fail(f"len(sorted_ids) = {p} must be a multiple of block_m = {block_m}")
  _check_operand("sorted_ids", sorted_ids, np.int32, (p,))
  _check_operand("block_expert", block_expert, np.int32, (p // block_m,))
  _check_operand("num_padded", num_padded, np.int32, (1,))
  _check_operand("topk_weights", topk_weights, np.float32,
                 (num_rows_out,) if mul_topk_weight else (0,))
  _check_operand("bias", bias, np.float32, (e, n) if has_bias else (0,))


# ----------------------------------------------------------------------------- primitive

nvfp4_moe_gemm_p = Primitive("nvfp4_moe_gemm")


def _abstract_eval(x, qweight, qscales, global_scale, sorted_ids, block_expert, num_padded,
                   topk_weights, bias, **params):
  _check_gemm(x, qweight, qscales, global_scale, sorted_ids, block_expert, num_padded,
              topk_weights, bias, **params)
  return jax.core.ShapedArray((params["num_rows_out"], _out_columns(params)), x.dtype)


def _out_columns(params) -> int:
  gated = params.get("activation", "none") in GATED_ACTIVATIONS
  return params["n"] // 2 if gated else params["n"]


nvfp4_moe_gemm_p.def_abstract_eval(_abstract_eval)
nvfp4_moe_gemm_p.def_impl(lambda *args, **params: jax.jit(
    lambda *a: nvfp4_moe_gemm_p.bind(*a, **params))(*args))


# ----------------------------------------------------------------------------- reference

#: The reference dequantizes all experts at once (and one weight per block) only below these
#: float32 element counts; above, it loops over blocks and dequantizes one expert at a time.
SMALL_ALL_EXPERTS = 1 << 22
SMALL_PER_BLOCK = 1 << 24


def grouped_gemm_reference(x, unit_weight, num_experts, global_scale, sorted_ids, block_expert,
                           num_padded, topk_weights, bias, *, n, k, gather_div, num_rows_out,
                           block_m, mul_topk_weight, has_bias, zero_unwritten=True,
                           all_unit_weights=None, activation="none", limit=math.inf,
                           alpha=GPTOSS_ALPHA):
  """Pure-JAX implementation of the contract for any weight storage.

  ``activation``, ``limit``, ``alpha``: the contract's fused activation (a gated one reads the
  weight's rows in ``gate_up_pairs`` order).

  With ``zero_unwritten=False`` the rows no block writes are NaN: "unspecified" made loud, so
  that a caller reading them (fused_moe must not) fails its tests on every platform.

  ``unit_weight(e)`` returns expert ``e``'s float32 ``[n, k]`` weight without its global scale
  (``e`` may be traced); ``all_unit_weights()`` (optional) returns all ``[E, n, k]`` and is used
  when that is small. Products are float32 with ``Precision.HIGHEST``.
  """
  p = sorted_ids.shape[0]
  nb = p // block_m
  r = x.shape[0]
  dtype = x.dtype
  gated = activation in GATED_ACTIVATIONS
  n_out = n // 2 if gated else n
  out = jnp.full((num_rows_out, n_out), 0.0 if zero_unwritten else jnp.nan, jnp.float32)
  if nb == 0 or num_rows_out == 0 or r == 0:
    return out.astype(dtype)
  hi = jax.lax.Precision.HIGHEST
  # XLA may drop a float32 -> bf16 -> float32 round trip (xla_allow_excess_precision), e.g.
  # between the activation's cast and this GEMM's, or between our output cast and the
  # combine's sum. reduce_precision keeps the rounding the contract (and the kernel) has.
  finfo = jnp.finfo(dtype)
  to_dtype = lambda v: jax.lax.reduce_precision(v, finfo.nexp, finfo.nmant)
  x = to_dtype(x.astype(jnp.float32))

  def epilogue(acc, e, sids):
    """acc [..., rows, n] float32 of expert(s) e -> times gs[e], plus bias[e], the activation
    ([..., rows, n_out]), times weight."""
    acc = acc * global_scale[e][..., None]
    if has_bias:
      acc = acc + bias[e]
    if activation != "none":
      acc = apply_activation(acc, activation, intermediate_size=n_out if gated else n,
                             limit=limit if math.isfinite(limit) else None, alpha=alpha,
                             dtype=jnp.float32, gate_up_pairs=True)
    safe = jnp.clip(sids, 0, max(num_rows_out - 1, 0))
    if mul_topk_weight:
      acc = acc * topk_weights[safe][..., None]
    return acc

  small = (all_unit_weights is not None and num_experts * n * k <= SMALL_ALL_EXPERTS
           and nb * n * k <= SMALL_PER_BLOCK)
  if small:
    w_all = all_unit_weights()                                           # [E, n, k]
    blocks = jnp.arange(nb, dtype=jnp.int32)
    be = block_expert
    use = (blocks * block_m < num_padded[0]) & (be >= 0) & (be < num_experts)
    e_safe = jnp.clip(be, 0, num_experts - 1)
    sids = sorted_ids.reshape(nb, block_m)
    rows = x[jnp.clip(sids // gather_div, 0, r - 1)]                     # [nb, bm, k]
    acc = jnp.einsum("bmk,bnk->bmn", rows, w_all[e_safe], precision=hi,
                     preferred_element_type=jnp.float32)
    acc = epilogue(acc, e_safe[:, None], sids)
    valid = use[:, None] & (sids >= 0) & (sids < num_rows_out)
    dest = jnp.where(valid, sids, num_rows_out).reshape(p)
    out = out.at[dest].set(acc.reshape(p, n_out), mode="drop")
    return to_dtype(out).astype(dtype)

  # One block at a time; the current expert's weight is carried and re-dequantized only when
  # the block expert changes (aligned blocks of an expert are consecutive), so at most one
  # expert's float32 weight is alive.
  used_blocks = jnp.clip((num_padded[0] + block_m - 1) // block_m, 0, nb)

  def body(b, carry):
    out, cur_e, w = carry
    e = block_expert[b]
    ok = (e >= 0) & (e < num_experts)
    e_safe = jnp.clip(e, 0, num_experts - 1)
    w = jax.lax.cond(ok & (e_safe != cur_e), lambda: unit_weight(e_safe), lambda: w)
    cur_e = jnp.where(ok, e_safe, cur_e)
    sids = jax.lax.dynamic_slice_in_dim(sorted_ids, b * block_m, block_m)
    rows = x[jnp.clip(sids // gather_div, 0, r - 1)]
    acc = jnp.einsum("mk,nk->mn", rows, w, precision=hi, preferred_element_type=jnp.float32)
    acc = epilogue(acc, e_safe, sids)
    valid = ok & (sids >= 0) & (sids < num_rows_out)
    out = out.at[jnp.where(valid, sids, num_rows_out)].set(acc, mode="drop")
    return out, cur_e, w

  init = (out, jnp.int32(-1), jnp.zeros((n, k), jnp.float32))
  out, _, _ = jax.lax.fori_loop(0, used_blocks, body, init)
  return to_dtype(out).astype(dtype)


def _unit(w: NVFP4Weight) -> jax.Array:
  """float32 e2m1 x block scale (no global scale), exact."""
  ones = jnp.ones(w.global_scale.shape, jnp.float32)
  return dequantize(NVFP4Weight(w.packed, w.scales, ones), jnp.float32)


def _reference_lowering(x, qweight, qscales, global_scale, sorted_ids, block_expert, num_padded,
                        topk_weights, bias, *, n, k, backend, expert_rows=0, **params):
  del backend, expert_rows  # the caller chose this lowering; a launch hint
  def unit(q, s):  # _unit of the prepared weight
    return dequantize_blocks_reference(q, s, n=n, k=k, dtype=jnp.float32)

  return grouped_gemm_reference(
      x, lambda e: unit(qweight[e], qscales[e]), qweight.shape[0],
      global_scale, sorted_ids, block_expert, num_padded, topk_weights, bias, n=n, k=k,
      all_unit_weights=lambda: unit(qweight, qscales), **params)


_reference_rule = mlir.lower_fun(_reference_lowering, multiple_results=False)


def _default_lowering(ctx, *args, backend, **params):
  """Every platform but cuda: the reference (``backend="cuda"`` cannot lower here)."""
  if backend == "cuda":
    raise ValueError(f"nvfp4_moe_gemm: backend='cuda' runs the CUDA kernel, which cannot lower "
                     f"for platform(s) {tuple(ctx.module_context.platforms)}; use backend='auto' "
                     "or 'reference' there")
  return _reference_rule(ctx, *args, backend=backend, **params)


mlir.register_lowering(nvfp4_moe_gemm_p, _default_lowering)

# The CUDA handler (csrc/nvfp4_moe_gemm.cu) takes more than the contract: a split-K factor
# ``splits`` and ``cluster`` (attributes: whether the splits reduce in a thread-block cluster),
# ``k_slices`` and ``tiles_per_block`` (K split among a block's warps, several N tiles per
# block) and a uint8 workspace (second result: split-K tickets and fp32 partials when the
# splits do not reduce in a cluster). All are launch details chosen here at lowering time from
# the static shapes; the primitive keeps its single result.

_WARPS_PER_BLOCK = 8  # csrc kWarps: one block covers 8 * 16 = 128 rows of N


def moe_cluster_limit(block_m: int, bf16: bool = True) -> int:
  """Largest split-K factor the grouped GEMM reduces inside a thread-block cluster (sm_90);
  0 where there is no cluster path (the splits then reduce through the global workspace)."""
  return _ffi.cluster_limit(block_m // 8, bf16, True)


#: A split must get at least this many k64 chunks: below, the split-K end (ticket or cluster)
#: costs more than the extra parallelism gains (NOTES_moe.md v5: at decode the Qwen3-like
#: GEMMs, K = 2048 and 768, run fastest unsplit; the Mixtral-like GEMM2, K = 14336, in 4).
MIN_CHUNKS_PER_SPLIT = 48


def choose_moe_splits(num_slots: int, n: int, k: int, block_m: int, bf16: bool = True) -> int:
  """Split-K factor of the grouped GEMM: enough (N block, token tile, split) blocks to fill one
  wave of resident blocks, with at least ``MIN_CHUNKS_PER_SPLIT`` k64 chunks per split (at
  most 64 splits, and never more than the kernel's pipeline units)."""
  n_blocks = -(-(-(-n // 16)) // _WARPS_PER_BLOCK)
  tiles = max(1, num_slots // block_m)
  k64 = -(-k // 64)
  sms = _ffi.sm_count() or 132
  resident = sms * (_ffi.moe_blocks_per_sm(block_m // 8, bf16) or 2)
  splits = resident // (n_blocks * tiles)
  return int(max(1, min(splits, k64 // MIN_CHUNKS_PER_SPLIT,
                        -(-k64 // dense_ops.unsliced_unit_chunks(block_m // 8)), 64)))


#: K-slices of the grouped GEMM at block_m 8: the dense kernel's decode values (one kernel).
MOE_K_SLICES = DECODE_K_SLICES
PAIR_K_SLICES = dense_ops.PAIR_K_SLICES


#: The k-sliced grid is sized from the static token-tile count (``capacity``), which counts
#: every tile that could hold a row; with more tiles than this it over-counts the real ones and
#: the grid falls short of a wave (NOTES_moe.md v7).
MOE_K_SLICES_MAX_TOKEN_TILES = 4


def choose_moe_k_slices(num_slots: int, n: int, k: int, block_m: int,
                        expert_rows: int = 0) -> int:
  """1, or ``MOE_K_SLICES`` / ``PAIR_K_SLICES`` (dense ``choose_slice_count``): K split among
  the 8 warps of each block, one 16-row N tile (or a pair) of one token tile at a time,
  ``choose_moe_tiles_per_block`` of them per block. Chosen at block_m 8 for at most
  ``MOE_K_SLICES_MAX_TOKEN_TILES`` token tiles (decode with top_k <= 4: the unsliced grid has
  few blocks, needs split K or leaves a ragged second wave) and K a whole number of 8-slice
  units (2048). Measured per GEMM on an H100 (NOTES_moe.md v7): Mixtral-like at T = 1 (2
  tiles) 69.7 -> 58.8 and 31.3 -> 29.4 us; a loss at 8 tiles with K = 7168 (3.5 units: 54.4 ->
  62.3), at K = 768 (6.9 -> 11.8) and at T = 16 (11 to 128 static tiles). ``expert_rows``: the
  launch's hint, which picks the block and so its occupancy."""
  tiles = num_slots // block_m
  if (block_m != 8 or k % K_SLICES_MIN_K != 0 or tiles > MOE_K_SLICES_MAX_TOKEN_TILES
      or dense_ops.k_sliced_blocks_per_sm(moe=True, m_tile=1) < 1):
    return 1
  return dense_ops.choose_slice_count(n, moe=True, token_tiles=max(1, tiles), rows=expert_rows)


def choose_moe_tiles_per_block(num_slots: int, n: int, block_m: int, k_slices: int,
                               expert_rows: int = 0) -> int:
  """N tiles of 16 rows per block of a k-sliced launch: as the dense kernel's
  ``choose_tiles_per_block``, with every token tile's blocks in the wave (``expert_rows``: the
  launch's hint, which picks the block and so its occupancy)."""
  return dense_ops.choose_tiles_per_block(n, k_slices, moe=True,
                                          token_tiles=max(1, num_slots // block_m),
                                          rows=expert_rows)


#: Prefill (block_m 64, K not split): a block may run up to this many k-units (its N blocks'
#: K ranges one after another through one pipeline) ...
MOE_PREFILL_MAX_UNITS = 32
#: ... while the grid keeps at least this many waves of resident blocks.
MOE_PREFILL_MIN_WAVES = 4


#: Decode (block_m 8, unsliced, K not split): 2 N blocks per block where K is at most this
#: many units ...
MOE_DECODE_TILES_MAX_UNITS = 8
#: ... and the grid keeps at least this many waves of resident blocks with them.
MOE_DECODE_TILES_MIN_WAVES = 2


def choose_moe_prefill_tiles(num_slots: int, n: int, k: int, block_m: int, splits: int,
                             bf16: bool = True) -> int:
  """N blocks (of 128 rows) per block of an unsliced, unsplit launch, so that a block's start
  and pipeline fill are paid once for several N blocks of its token tile where K is short.

  block_m 64 (prefill): 4 or 2 while the block runs at most ``MOE_PREFILL_MAX_UNITS`` units and
  the grid keeps ``MOE_PREFILL_MIN_WAVES`` waves. Measured per GEMM on an H100 at T = 4096
  (NOTES_moe.md v8): Qwen3-like GEMM 2 (K = 768, 3 units) 573 -> 529 us with 4, DeepSeek-like
  GEMM 2 (K = 2048) 3726 -> 3523, Mixtral-like GEMM 1 (K = 4096) 5421 -> 5267 with 2; a loss
  where the grid fell under a wave (Mixtral-like GEMM 2 at T = 1024: 696 -> 965 us with 4).
  block_m 8 (decode): 2 where K is at most ``MOE_DECODE_TILES_MAX_UNITS`` units and the grid
  keeps ``MOE_DECODE_TILES_MIN_WAVES`` waves (H200, NOTES_moe.md v18: at T = 16 the Qwen3-like
  GEMM 2, K = 768, 29.0 -> 27.5 us, the DeepSeek-like one, K = 2048, 239.2 -> 233.3; losses with
  long K (Mixtral-like GEMM 1 at T = 4, 16 units: 96.8 -> 106.0) and under a few waves). Else 1.
  """
  if splits != 1 or block_m not in (8, 64):
    return 1
  n_blocks = -(-(-(-n // 16)) // _WARPS_PER_BLOCK)
  tiles = max(1, num_slots // block_m)
  units = -(-(-(-k // 64)) // dense_ops.unsliced_unit_chunks(block_m // 8))
  resident = (_ffi.sm_count() or 132) * (_ffi.moe_blocks_per_sm(block_m // 8, bf16) or 1)
  if block_m == 8:
    fits = (2 <= n_blocks and units <= MOE_DECODE_TILES_MAX_UNITS
            and -(-n_blocks // 2) * tiles >= MOE_DECODE_TILES_MIN_WAVES * resident)
    return 2 if fits else 1
  for t in (4, 2):
    if (t <= n_blocks and units * t <= MOE_PREFILL_MAX_UNITS
        and -(-n_blocks // t) * tiles >= MOE_PREFILL_MIN_WAVES * resident):
      return t
  return 1


def use_moe_cluster(splits: int, block_m: int, bf16: bool = True) -> bool:
  """Whether the splits reduce in a thread-block cluster (sm_90): for 2 to
  ``ops.dense.CLUSTER_MAX_SPLITS`` splits, as the dense kernel (same epilogue)."""
  return 1 < splits <= min(CLUSTER_MAX_SPLITS, moe_cluster_limit(block_m, bf16))


def moe_workspace_bytes(num_slots: int, n: int, block_m: int, splits: int,
                        cluster: bool = False) -> int:
  """Bytes of the kernel's workspace: tickets (one int32 per (token tile, N block), padded to
  256 B) then ``splits * num_slots * n`` fp32 partials; 256 when there is no split or the
  splits reduce in a cluster."""
  if splits <= 1 or num_slots == 0 or cluster:
    return 256
  tiles = num_slots // block_m
  n_blocks = -(-(-(-n // 16)) // _WARPS_PER_BLOCK)
  tickets = -(-(tiles * n_blocks * 4) // 256) * 256
  return tickets + splits * num_slots * n * 4


#: Token tiles one grouped-GEMM launch takes (its grid's z dimension; csrc/nvfp4_moe_gemm.cu).
MAX_TOKEN_TILES = 65535


def check_token_tiles(op: str, num_slots: int, block_m: int) -> None:
  """Raises where one launch cannot take ``num_slots // block_m`` token tiles, at trace time
  rather than as the handler's error (fused_moe splits such a batch itself)."""
  if num_slots // block_m > MAX_TOKEN_TILES:
    raise ValueError(f"{op}: {num_slots} aligned rows in blocks of {block_m} are "
                     f"{num_slots // block_m} token tiles, more than one launch takes "
                     f"({MAX_TOKEN_TILES}); split the batch (fused_moe does)")


def tokens_per_launch(num_tokens: int, top_k: int, num_experts: int, block_m: int) -> int:
  """The most tokens of a batch whose aligned rows (``capacity``) stay within
  ``MAX_TOKEN_TILES`` blocks of ``block_m``: ``num_tokens`` itself where the whole batch does
  (on an H100 up to ~500K tokens at top-8; an A10 / L4 at block_m 8, ~65K)."""
  def fits(t):
    return capacity(t * top_k, num_experts, block_m) // block_m <= MAX_TOKEN_TILES
  lo, hi = 1, num_tokens  # capacity grows with t: the largest t that fits, at least 1
  while lo < hi:
    mid = (lo + hi + 1) // 2
    lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
  return lo


def check_block_m_fits(op: str, block_m: int) -> None:
  """Raises where this GPU cannot launch the grouped GEMM's block for ``block_m`` (its shared
  memory; ``ops.dense.fitting_m_tile``), before anything runs rather than at the launch."""
  fits = 8 * dense_ops.fitting_m_tile(block_m // 8, moe=True)
  if fits < block_m:
    raise ValueError(f"{op}: block_m = {block_m} needs more shared memory per block than this "
                     f"GPU allows; block_m <= {fits} fits (fused_moe chooses it by itself)")


def moe_launch_spec(num_slots: int, n: int, k: int, block_m: int, expert_rows: int = 0,
                    bf16: bool = True) -> tuple[int, int, bool, int]:
  """``(k_slices, splits, cluster, tiles_per_block)``: the launch the CUDA lowering picks for one
  grouped GEMM of ``num_slots`` aligned rows (``len(sorted_ids)``) from the static shapes."""
  k_slices = choose_moe_k_slices(num_slots, n, k, block_m, expert_rows)
  splits = 1 if k_slices > 1 else choose_moe_splits(num_slots, n, k, block_m, bf16)
  cluster = use_moe_cluster(splits, block_m, bf16)
  if k_slices > 1:
    tiles_per_block = choose_moe_tiles_per_block(num_slots, n, block_m, k_slices, expert_rows)
  else:
    tiles_per_block = choose_moe_prefill_tiles(num_slots, n, k, block_m, splits, bf16)
  return k_slices, splits, cluster, tiles_per_block


def _moe_gemm_cuda_lowering(ctx, x, qweight, qscales, global_scale, sorted_ids, block_expert,
                            num_padded, topk_weights, bias, *, n, k, gather_div, num_rows_out,
                            block_m, mul_topk_weight, has_bias, zero_unwritten=True,
                            backend="auto", expert_rows=0, activation="none", limit=math.inf,
                            alpha=GPTOSS_ALPHA):
  """The cuda platform's lowering: the kernel, or the reference for ``backend="reference"``
  (and for ``"auto"`` where the kernel is not built: ``_ffi.REGISTERED`` at lowering time)."""
  params = dict(n=n, k=k, gather_div=gather_div, num_rows_out=num_rows_out, block_m=block_m,
                mul_topk_weight=mul_topk_weight, has_bias=has_bias,
                zero_unwritten=zero_unwritten, backend=backend, expert_rows=expert_rows,
                activation=activation, limit=limit, alpha=alpha)
  built = CUDA_TARGET in _ffi.REGISTERED
  if backend == "reference" or (backend == "auto" and not built):
    return _reference_rule(ctx, x, qweight, qscales, global_scale, sorted_ids, block_expert,
                           num_padded, topk_weights, bias, **params)
  if not built:
    raise ValueError(_kernel_missing())
  dense_ops.check_kernel_weight_size("nvfp4_moe_gemm", n, k)
  x_aval, slots = ctx.avals_in[0], ctx.avals_in[4].shape[0]
  bf16 = np.dtype(x_aval.dtype) == np.dtype(jnp.bfloat16)
  check_block_m_fits("nvfp4_moe_gemm", block_m)
  check_token_tiles("nvfp4_moe_gemm", slots, block_m)
  k_slices, splits, cluster, tiles_per_block = moe_launch_spec(slots, n, k, block_m,
                                                               expert_rows, bf16)
  ws = jax.core.ShapedArray((moe_workspace_bytes(slots, n, block_m, splits, cluster),),
                            jnp.uint8)
  results = jax.ffi.ffi_lowering(CUDA_TARGET)(
      ctx.replace(avals_out=[ctx.avals_out[0], ws]), x, qweight, qscales, global_scale,
      sorted_ids, block_expert, num_padded, topk_weights, bias, n=np.int64(n), k=np.int64(k),
      gather_div=np.int64(gather_div), num_rows_out=np.int64(num_rows_out),
      block_m=np.int64(block_m), splits=np.int64(splits), mul_topk_weight=bool(mul_topk_weight),
      has_bias=bool(has_bias), cluster=bool(cluster), zero_unwritten=bool(zero_unwritten),
      k_slices=np.int64(k_slices), tiles_per_block=np.int64(tiles_per_block),
      expert_rows=np.int64(expert_rows), activation=np.int64(ACTIVATION_CODES[activation]),
      act_limit=np.float32(limit), act_alpha=np.float32(alpha))
  return [results[0]]


# Registered everywhere: the rule itself falls back to the reference where the kernel is not
# built (so a backend="reference" computation never reaches the kernel, and cross-platform
# lowering for cuda works from any host).
mlir.register_lowering(nvfp4_moe_gemm_p, _moe_gemm_cuda_lowering, platform="cuda")


# ----------------------------------------------------------------------------- batching

# A batch of schedules (x, ids, weights...) over shared expert weights runs one grouped GEMM
# per batch element; batched expert weights are not supported.
batching.primitive_batchers[nvfp4_moe_gemm_p] = map_unless_weights_batched(
    nvfp4_moe_gemm_p, (1, 2, 3, 8), "qweight, qscales, global_scale, bias")


# ----------------------------------------------------------------------------- wrappers

def _empty_f32():
  return jnp.zeros((0,), jnp.float32)


def nvfp4_moe_gemm(x: jax.Array, w: PreparedNVFP4Weight, alignment: Alignment, *, gather_div: int,
                   num_rows_out: int, topk_weights: jax.Array | None = None,
                   bias: jax.Array | None = None, zero_unwritten: bool = True,
                   backend: str | None = "auto", expert_rows: int = 0,
                   activation: str = "none", limit: float | None = None,
                   alpha: float = GPTOSS_ALPHA) -> jax.Array:
  """One grouped GEMM through ``nvfp4_moe_gemm_p`` (see the module docstring for semantics).

  Args:
    x: bfloat16/float16 ``[R, k]``: GEMM1's tokens (``R = M``) or GEMM2's rows (``R = M*top_k``).
    w: a stacked ``PreparedNVFP4Weight`` ``[E, n, k]`` (``prepare`` of an ``[E, n, k]``
      ``NVFP4Weight``).
    alignment: the schedule from ``align_tokens`` (pair ids grouped per expert in blocks).
    gather_div: output row ``sid`` reads input row ``sid // gather_div`` (``top_k`` for GEMM1,
      1 for GEMM2); ``R * gather_div >= num_rows_out``.
    num_rows_out: rows of the result (``M * top_k``).
    topk_weights: optional float ``[num_rows_out]``, multiplied into each row in the float32
      epilogue.
    bias: optional float ``[E, n]``, added in float32 before the top-k weight.
    zero_unwritten: False leaves the rows no block writes unspecified (no memset in the
      kernel); for callers that never read them.
    backend: None/``"auto"``, ``"cuda"`` or ``"reference"``, the primitive's lowering choice
      (module docstring); ``"cuda"`` raises a ``ValueError`` here when the kernel is not built.
    expert_rows: a launch hint that changes no result: the most rows one expert's block is
      expected to hold (``M`` for top-k routing, whose experts per token are distinct); 0 (the
      default) for none. At 1-4 the decode launch holds only that many x rows per block.
    activation: ``"none"`` (default), ``"relu2"``, or a gated ``"swiglu"`` / ``"gptoss"``
      (``w`` prepared with ``gate_up_pairs=True``), applied in float32 before the top-k
      weight (module docstring); ``limit`` (swiglu's optional clamp, gptoss's required one)
      and ``alpha`` as in ``fused_moe``.

  Returns ``[num_rows_out, n]`` in ``x.dtype`` (``n // 2`` columns after a gated activation):
  row ``sid`` is ``act((x[sid // gather_div] @ W_e.T) * global_scale[e] + bias[e]) *
  topk_weights[sid]`` for the expert ``e`` of its block; rows no block writes are zero
  (unspecified with ``zero_unwritten=False``).
  """
  if not isinstance(w, PreparedNVFP4Weight):
    raise TypeError(f"nvfp4_moe_gemm: w must be a stacked PreparedNVFP4Weight, got "
                    f"{type(w).__name__}")
  backend = "auto" if backend is None else backend
  if backend not in LOWERINGS:
    raise ValueError(f"nvfp4_moe_gemm: backend must be None or one of {LOWERINGS}, got "
                     f"{backend!r}")
  if backend == "cuda" and CUDA_TARGET not in _ffi.REGISTERED:
    raise ValueError(_kernel_missing())
  gated = activation in GATED_ACTIVATIONS
  if gated and not w.gate_up_pairs:
    raise ValueError(f"nvfp4_moe_gemm: the fused {activation!r} reads gate/up row pairs: "
                     "prepare w13 with prepare(w13, gate_up_pairs=True)")
  if not gated and w.gate_up_pairs:
    raise ValueError("nvfp4_moe_gemm: w is in gate_up_pairs row order, which only a fused "
                     f"gated activation reads (got activation={activation!r})")
  if activation == "gptoss" and limit is None:
    raise ValueError("nvfp4_moe_gemm: activation 'gptoss' needs limit (gpt-oss uses 7.0)")
  if num_rows_out > alignment.num_pairs:
    # Slots past the pairs hold the sentinel num_pairs: with more rows they would count as rows.
    raise ValueError(f"nvfp4_moe_gemm: num_rows_out = {num_rows_out} exceeds the alignment's "
                     f"{alignment.num_pairs} (token, k) pairs")
  tw = _empty_f32() if topk_weights is None else jnp.asarray(topk_weights).astype(jnp.float32)
  b = _empty_f32() if bias is None else jnp.asarray(bias).astype(jnp.float32)
  return nvfp4_moe_gemm_p.bind(
      x, w.qweight, w.qscales, w.global_scale, alignment.sorted_ids, alignment.block_expert,
      alignment.num_padded, tw, b, n=w.n, k=w.k, gather_div=gather_div,
      num_rows_out=num_rows_out, block_m=alignment.block_m,
      mul_topk_weight=topk_weights is not None, has_bias=bias is not None,
      zero_unwritten=bool(zero_unwritten), backend=backend, expert_rows=expert_rows,
      activation=activation, limit=math.inf if limit is None else float(limit),
      alpha=float(alpha))


def _checkpoint_moe_gemm(x, w: NVFP4Weight, alignment: Alignment, *, gather_div, num_rows_out,
                         topk_weights=None, bias=None, zero_unwritten=True, activation="none",
                         limit=None, alpha=GPTOSS_ALPHA):
  """The same contract as ``nvfp4_moe_gemm`` for a checkpoint-layout stacked weight, in pure JAX
  (CPU path: no prepare/unprepare round trip). A fused activation here is ``"relu2"`` only (a
  gated one reads gate/up pairs, a layout only ``prepare`` makes)."""
  if activation in GATED_ACTIVATIONS:
    raise ValueError(f"the fused {activation!r} reads gate/up row pairs: prepare w13 with "
                     "prepare(w13, gate_up_pairs=True)")
  e, n, k = w.shape
  tw = _empty_f32() if topk_weights is None else topk_weights.astype(jnp.float32)
  b = _empty_f32() if bias is None else bias.astype(jnp.float32)
  expert = lambda i: NVFP4Weight(w.packed[i], w.scales[i], w.global_scale[i])
  return grouped_gemm_reference(
      x, lambda i: _unit(expert(i)), e, w.global_scale.astype(jnp.float32), alignment.sorted_ids,
      alignment.block_expert, alignment.num_padded, tw, b, n=n, k=k, gather_div=gather_div,
      num_rows_out=num_rows_out, block_m=alignment.block_m,
      mul_topk_weight=topk_weights is not None, has_bias=bias is not None,
      zero_unwritten=zero_unwritten, all_unit_weights=lambda: _unit(w), activation=activation,
      limit=math.inf if limit is None else float(limit), alpha=alpha)


def _kernel_wanted() -> bool:
  """Whether the default backend would run the CUDA grouped GEMM (decided at trace time)."""
  return CUDA_TARGET in _ffi.REGISTERED and jax.default_backend() == "gpu"


def resolve_backend(backend: str | None, activation: str = "swiglu",
                    limit: float | None = None) -> str:
  """``fused_moe``'s ``backend`` argument -> the primitive's lowering (one of ``LOWERINGS``).

  * ``"reference"`` -> ``"reference"``.
  * ``"cuda"`` -> ``"cuda"`` if ``jax_nvfp4.backend.select_backend(backend="cuda", ...)`` accepts
    this machine's default device (a CUDA GPU with compute capability >= 8.0 and the grouped-GEMM
    kernel built), else its ``ValueError`` listing the reasons.
  * None/``"auto"``: where the default device is a GPU, ``select_backend``'s choice (``"cuda"``
    on SM80+ with the kernel built, else ``"reference"``); on any other host ``"auto"``, so that
    lowering for the cuda platform from there (``jax.export``) still picks the kernel.

  Decided at trace time.
  """
  if backend == "reference":
    return "reference"
  if backend in (None, "auto"):
    if jax.default_backend() != "gpu":
      return "auto"
    backend = None
  elif backend != "cuda":
    raise ValueError(f"fused_moe: backend must be None, 'auto', 'cuda' or 'reference', got "
                     f"{backend!r}")
  from jax_nvfp4 import backend as backend_lib  # pylint: disable=import-outside-toplevel
  try:
    choice = backend_lib.select_backend(weight_format="nvfp4", moe_activation=activation,
                                        limit=limit, backend=backend)
  except ValueError as e:
    raise ValueError(f"fused_moe: {e}") from None
  return choice.name


# ----------------------------------------------------------------------------- fused_moe

def _stacked_shape(w, name) -> tuple[int, int, int]:
  if isinstance(w, NVFP4Weight):
    check_weight(w.packed, w.scales, w.global_scale, name=name)
  elif isinstance(w, PreparedNVFP4Weight):
    if w.qweight.ndim == 5:
      want_w, want_s = kernel_shapes(w.n, w.k)
      e = w.qweight.shape[0]
      if (tuple(w.qweight.shape) != (e, *want_w) or tuple(w.qscales.shape) != (e, *want_s)
          or tuple(w.global_scale.shape) != (e,)):
        raise ValueError(f"fused_moe: {name} is not a consistent stacked PreparedNVFP4Weight "
                         f"for [E, N, K] = [{e}, {w.n}, {w.k}]: qweight {w.qweight.shape}, "
                         f"qscales {w.qscales.shape}, global_scale {w.global_scale.shape}")
  else:
    raise TypeError(f"fused_moe: {name} must be a stacked NVFP4Weight or PreparedNVFP4Weight "
                    f"[E, N, K], got {type(w).__name__}")
  if len(w.shape) != 3:
    raise ValueError(f"fused_moe: {name} must be stacked experts [E, N, K], got logical shape "
                     f"{tuple(w.shape)}")
  return tuple(int(d) for d in w.shape)


def _float_array(a, name, shape):
  a = jnp.asarray(a)
  if not jnp.issubdtype(a.dtype, jnp.floating):
    raise TypeError(f"fused_moe: {name} must be floating, got {a.dtype}")
  if tuple(a.shape) != tuple(shape):
    raise ValueError(f"fused_moe: {name} must have shape {tuple(shape)}, got {tuple(a.shape)}")
  return a.astype(jnp.float32)


def _check_expert_map(expert_map, e_local):
  expert_map = jnp.asarray(expert_map)
  if expert_map.ndim != 1 or not jnp.issubdtype(expert_map.dtype, jnp.signedinteger):
    raise ValueError(f"fused_moe: expert_map must be a signed integer [E_global] array (global "
                     f"id -> local id or -1), got {expert_map.dtype} {expert_map.shape}")
  e_global = expert_map.shape[0]
  if e_global < e_local:
    raise ValueError(f"fused_moe: expert_map has {e_global} entries but the weights hold "
                     f"{e_local} local experts")
  try:
    values = np.asarray(expert_map)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    values = None  # traced: the values cannot be checked here
  if values is not None:
    if values.min(initial=-1) < -1 or values.max(initial=-1) >= e_local:
      raise ValueError(f"fused_moe: expert_map values must be -1 or a local id in "
                       f"[0, {e_local}), got range [{values.min()}, {values.max()}]")
    local = values[values >= 0]
    if len(np.unique(local)) != len(local):
      raise ValueError("fused_moe: expert_map maps two global experts to one local expert")
  expert_map = expert_map.astype(jnp.int32)
  if values is None:
    # Not checked above: a value outside [0, E_local) would name an expert the weights do not
    # hold (a read past them in the kernel), so it counts as held elsewhere. A concrete map
    # was checked, so its layer pays for no such op.
    expert_map = jnp.where((expert_map >= 0) & (expert_map < e_local), expert_map, -1)
  return expert_map, e_global


def fused_moe(x: jax.Array, w13: NVFP4Weight | PreparedNVFP4Weight,
              w2: NVFP4Weight | PreparedNVFP4Weight, *, router_logits: jax.Array | None = None,
              topk_weights: jax.Array | None = None, topk_ids: jax.Array | None = None,
              top_k: int | None = None, routing: RoutingConfig | None = None,
              activation: str = "swiglu", limit: float | None = None,
              alpha: float = GPTOSS_ALPHA, w13_bias: jax.Array | None = None,
              w2_bias: jax.Array | None = None, expert_map: jax.Array | None = None,
              block_m: int | None = None, backend: str | None = None) -> jax.Array:
  """A whole MoE layer with NVFP4 expert weights: route -> align -> GEMM1 -> activation ->
  GEMM2 x top-k weight -> sum over top-k.

  Args:
    x: ``[M, H]`` (or ``[..., H]``, folded into M) bfloat16 or float16 tokens.
    w13: stacked gate/up weight ``[E, N13, H]``: ``N13 = 2I`` with rows ``[gate; up]`` for gated
      activations (see ``deinterleave_gate_up`` for gpt-oss checkpoints), ``N13 = I`` for
      ``relu2``. An ``NVFP4Weight`` (checkpoint layout) or a stacked ``PreparedNVFP4Weight``.
    w2: stacked down weight ``[E, H, I]``, same two kinds.
    router_logits: float ``[..., E_global]``; routed with ``routing`` (a ``RoutingConfig``) or,
      if only ``top_k`` is given, softmax -> top-k -> renormalize (Mixtral / Qwen3).
    topk_weights, topk_ids: instead of logits, a precomputed routing: float ``[..., top_k]`` and
      integer ``[..., top_k]`` global expert ids (ids outside ``[0, E_global)`` are dropped).
    top_k: experts per token (optional when ``routing`` or ``topk_ids`` says it).
    activation: ``"swiglu"`` (``limit`` optional: DeepSeek-V4 clamp), ``"gptoss"`` (``limit``
      required, gpt-oss uses 7.0; ``alpha``), ``"relu2"`` (no ``limit``).
    w13_bias, w2_bias: optional float ``[E, N13]`` / ``[E, H]`` per-expert biases, added in
      float32 to GEMM1's output before the activation / to GEMM2's before the top-k weight.
    expert_map: optional integer ``[E_global]``: global id -> local id (an index into w13/w2's
      E) or -1 for experts held elsewhere. Pairs routed to -1 experts contribute zero, so the
      sum of ``fused_moe`` over a partition of the experts equals the full layer.
    block_m: rows per expert block (8/16/32/64); default ``choose_block_m(M, top_k, E_global)``.
    backend: which implementation runs the grouped GEMMs, in ``jax_nvfp4.backend``'s names
      (``resolve_backend``, decided at trace time): None or ``"auto"`` (the CUDA kernel on a
      CUDA GPU with compute capability >= 8.0 and the kernel built, the pure-JAX reference
      elsewhere, including a computation a GPU machine places on its CPU), ``"reference"``
      (always the pure-JAX reference, on a GPU too: prepared weights go through the primitive's
      reference lowering, checkpoint-layout ones are never prepared)
      or ``"cuda"`` (the kernel; a ``ValueError`` listing the reasons where it cannot run).

  Returns:
    ``[..., H]`` in ``x.dtype``: ``sum_j w_j * (act(x @ W13[e_j].T + b13) @ W2[e_j].T + b2)``,
    where the activation's output is rounded to ``x.dtype`` (its math is float32), each GEMM2
    row (weight applied in float32) is rounded to ``x.dtype``, and the sum over top-k is
    float32 before the final cast. GEMM1 applies the activation to its float32 result in its
    epilogue (GEMM1 writes ``[M*k, I]``) for ``relu2`` and for a gated w13 prepared by
    ``prepare(w13, gate_up_pairs=True)``; a gated w13 in the plain ``[gate; up]`` order
    (a checkpoint-layout weight, or ``prepare(w13)``) has GEMM1's ``[M*k, 2I]`` output rounded
    to ``x.dtype`` first and the activation applied by XLA (one kernel and one rounding more).
    The reference path rounds at the same points as the kernel.

  Where the kernel runs, unprepared weights are prepared on the fly inside the computation (call
  ``prepare`` once to avoid that, with ``gate_up_pairs=True`` for a gated w13); the pure-JAX
  reference has identical semantics.
  """
  x = jnp.asarray(x)
  if np.dtype(x.dtype) not in ACTIVATION_DTYPES:
    raise TypeError(f"fused_moe: x must be bfloat16 or float16 [M, H], got {x.dtype}")
  if x.ndim < 1:
    raise ValueError("fused_moe: x must be [M, H], got a scalar")
  lead, hidden = x.shape[:-1], x.shape[-1]
  m = int(np.prod(lead))
  e_local, n13, h13 = _stacked_shape(w13, "w13")
  e2, h2, inter = _stacked_shape(w2, "w2")
  if e2 != e_local:
    raise ValueError(f"fused_moe: w13 has E = {e_local} experts but w2 has {e2}")
  if h13 != hidden or h2 != hidden:
    raise ValueError(f"fused_moe: hidden size mismatch: x is [..., {hidden}], w13 is "
                     f"[E, N13, {h13}] and w2 is [E, {h2}, I] (both must be H = {hidden})")
  gated = is_gated(activation)
  want_n13 = 2 * inter if gated else inter
  if n13 != want_n13:
    raise ValueError(f"fused_moe: activation {activation!r} with w2 [E, H, I = {inter}] needs "
                     f"w13 [E, {want_n13}, H] ({'[gate; up] = 2I' if gated else 'I'} rows), "
                     f"got N13 = {n13}")
  if activation == "relu2" and limit is not None:
    raise ValueError("fused_moe: limit must be None for relu2 (it clamps nothing)")
  if activation == "gptoss" and limit is None:
    raise ValueError("fused_moe: activation 'gptoss' needs limit (gpt-oss uses limit=7.0)")
  if limit is not None and not (float(limit) > 0):
    raise ValueError(f"fused_moe: limit must be > 0, got {limit}")
  if activation == "gptoss" and not math.isfinite(float(limit)):
    raise ValueError(f"fused_moe: activation 'gptoss' needs a finite limit, got {limit}")
  if block_m is not None and block_m not in BLOCK_MS:
    raise ValueError(f"fused_moe: block_m must be one of {BLOCK_MS}, got {block_m!r}")
  lowering = resolve_backend(backend, activation, limit)

  if expert_map is not None:
    expert_map, e_global = _check_expert_map(expert_map, e_local)
  else:
    e_global = e_local

  # Routing.
  if router_logits is not None:
    if topk_weights is not None or topk_ids is not None:
      raise ValueError("fused_moe: give router_logits or (topk_weights, topk_ids), not both")
    if routing is None:
      if top_k is None:
        raise ValueError("fused_moe: router_logits needs top_k or routing=RoutingConfig(...)")
      routing = RoutingConfig(top_k=int(top_k))
    elif not isinstance(routing, RoutingConfig):
      raise TypeError(f"fused_moe: routing must be a RoutingConfig, got "
                      f"{type(routing).__name__}")
    elif top_k is not None and top_k != routing.top_k:
      raise ValueError(f"fused_moe: top_k = {top_k} disagrees with routing.top_k = "
                       f"{routing.top_k}")
    logits = jnp.asarray(router_logits)
    if tuple(logits.shape) != (*lead, e_global):
      raise ValueError(f"fused_moe: router_logits must have shape {(*lead, e_global)} "
                       f"(tokens x E_global), got {tuple(logits.shape)}")
    k = routing.top_k
    routing.validate(e_global)
  else:
    if topk_weights is None or topk_ids is None:
      raise ValueError("fused_moe: give router_logits (with top_k or routing) or both "
                       "topk_weights and topk_ids")
    if routing is not None:
      raise ValueError("fused_moe: routing applies to router_logits only")
    topk_ids = jnp.asarray(topk_ids)
    topk_weights = jnp.asarray(topk_weights)
    if not jnp.issubdtype(topk_ids.dtype, jnp.integer):
      raise TypeError(f"fused_moe: topk_ids must be integer, got {topk_ids.dtype}")
    if topk_ids.ndim != len(lead) + 1 or tuple(topk_ids.shape[:-1]) != tuple(lead):
      raise ValueError(f"fused_moe: topk_ids must be [{', '.join(map(str, lead))}, top_k] for "
                       f"x {tuple(x.shape)}, got {tuple(topk_ids.shape)}")
    if top_k is not None and topk_ids.shape[-1] != top_k:
      raise ValueError(f"fused_moe: top_k = {top_k} but topk_ids has {topk_ids.shape[-1]} "
                       "columns")
    topk_weights = _float_array(topk_weights, "topk_weights", topk_ids.shape)
    k = topk_ids.shape[-1]
    topk_ids = topk_ids.reshape(m, k).astype(jnp.int32)  # m may be 0: no -1 in the reshape
    topk_weights = topk_weights.reshape(m, k)
  if not 1 <= k <= e_global:
    raise ValueError(f"fused_moe: top_k = {k} must be in [1, E = {e_global}]")
  if w13_bias is not None:
    w13_bias = _float_array(w13_bias, "w13_bias", (e_local, n13))
  if w2_bias is not None:
    w2_bias = _float_array(w2_bias, "w2_bias", (e_local, hidden))
  if m == 0:
    return jnp.zeros((*lead, hidden), x.dtype)

  bm = block_m or choose_block_m(m, k, e_global)
  if lowering != "reference":
    if block_m is not None:
      check_block_m_fits("fused_moe", block_m)
    # block_m // 8 is the grouped GEMM's token tile; above 8 rows its block needs 100-104 KB of
    # shared memory, more than an A10 or L4 gives one (ops.dense.fitting_m_tile).
    bm = 8 * dense_ops.fitting_m_tile(bm // 8, moe=True)
    chunk = tokens_per_launch(m, k, e_global, bm)
    if chunk < m:
      # One grouped-GEMM launch takes at most MAX_TOKEN_TILES blocks of rows: a longer batch
      # (a long prefill, or block_m 8 on an A10 / L4) runs as consecutive token chunks, each
      # routed, aligned and combined alone (tokens never mix in a MoE layer).
      x2 = x.reshape(m, hidden)
      parts = []
      for start in range(0, m, chunk):
        rows_ = slice(start, min(m, start + chunk))
        route_kw = (dict(router_logits=logits.reshape(m, e_global)[rows_], routing=routing)
                    if router_logits is not None else
                    dict(topk_weights=topk_weights[rows_], topk_ids=topk_ids[rows_]))
        parts.append(fused_moe(x2[rows_], w13, w2, **route_kw, activation=activation,
                               limit=limit, alpha=alpha, w13_bias=w13_bias, w2_bias=w2_bias,
                               expert_map=expert_map, block_m=bm, backend=backend))
      return jnp.concatenate(parts).reshape(*lead, hidden)
  rows = m * k

  if isinstance(w13, PreparedNVFP4Weight) and w13.gate_up_pairs and not gated:
    raise ValueError(f"fused_moe: w13 was prepared with gate_up_pairs=True, which only a gated "
                     f"activation reads, but activation is {activation!r}")
  if lowering == "cuda":
    w13 = prepare(w13) if isinstance(w13, NVFP4Weight) else w13
    w2 = prepare(w2) if isinstance(w2, NVFP4Weight) else w2
  # GEMM1 applies the activation to its float32 result where it needs no row order (relu2) or
  # w13 holds its gate and up rows in pairs (prepare(w13, gate_up_pairs=True)); with a plain
  # [gate; up] w13 they meet only after GEMM1 has written them, rounded, and XLA applies it.
  fused = not gated or (isinstance(w13, PreparedNVFP4Weight) and w13.gate_up_pairs)
  # Chosen rather than asked for: the primitive still lowers per platform, so a computation
  # placed on the host of a GPU machine (jax.jit(..., device=cpu)) runs the reference there.
  primitive_backend = "auto" if backend in (None, "auto") and lowering == "cuda" else lowering
  if router_logits is not None:
    # One launch routes and aligns a decode-sized batch on a GPU (jax_nvfp4.ops.moe_route).
    topk_weights, topk_ids, alignment = route_and_align(
        logits.reshape(m, e_global), routing, bm, expert_map, backend=primitive_backend)
  else:
    alignment = align_tokens(topk_ids, e_global, bm, expert_map, backend=primitive_backend)

  def gemm(a, w, **kw):
    if isinstance(w, PreparedNVFP4Weight):
      # Top-k experts of a token are distinct: no expert's block holds more than m rows.
      return nvfp4_moe_gemm(a, w, alignment, num_rows_out=rows, backend=primitive_backend,
                            expert_rows=m, **kw)
    return _checkpoint_moe_gemm(a, w, alignment, num_rows_out=rows, **kw)

  # The rows of dropped pairs (ids out of range, or experts held elsewhere) are computed by no
  # block: GEMM2 reads only the rows GEMM1 wrote and the combine masks the rest, so neither
  # GEMM clears its output.
  x2 = x.reshape(m, hidden)
  if fused and w13_bias is not None and gated:
    w13_bias = interleave_gate_up(w13_bias, 1, n13 // 16)
  # Imported here: moe_pair builds on this module's primitive.
  from jax_nvfp4.ops import moe_pair  # pylint: disable=import-outside-toplevel
  one_call = (fused and moe_pair.pair_enabled() and isinstance(w13, PreparedNVFP4Weight)
              and isinstance(w2, PreparedNVFP4Weight))
  if one_call:  # both GEMMs in one handler (JAX_NVFP4_MOE_PAIR=1): the same bits
    y = moe_pair.nvfp4_moe_pair(x2, w13, w2, alignment, top_k=k,
                                topk_weights=topk_weights.reshape(rows), activation=activation,
                                limit=limit, alpha=alpha, w13_bias=w13_bias, w2_bias=w2_bias,
                                zero_unwritten=False, backend=primitive_backend,
                                expert_rows=m)                             # [M*k, H]
  elif fused:
    a = gemm(x2, w13, gather_div=k, bias=w13_bias, zero_unwritten=False,
             activation=activation, limit=limit, alpha=alpha)              # [M*k, I]
  else:
    h = gemm(x2, w13, gather_div=k, bias=w13_bias, zero_unwritten=False)  # [M*k, 2I]
    a = apply_activation(h, activation, intermediate_size=inter, limit=limit, alpha=alpha,
                         dtype=x.dtype)                                    # [M*k, I]
  if not one_call:
    y = gemm(a, w2, gather_div=1, topk_weights=topk_weights.reshape(rows),
             bias=w2_bias, zero_unwritten=False)                           # [M*k, H]
  kept = (topk_ids >= 0) & (topk_ids < e_global)
  if expert_map is not None:
    kept &= expert_map[jnp.clip(topk_ids, 0, e_global - 1)] >= 0
  y = jnp.where(kept[..., None], y.reshape(m, k, hidden).astype(jnp.float32), 0.0)
  out = jnp.sum(y, axis=1)
  return out.astype(x.dtype).reshape(*lead, hidden)
