"""Independent float64 NumPy oracle for MoE routing, token alignment and the whole layer.

Shares no code with jax_nvfp4: weights are dequantized with tests/numpy_reference.py, routing is
re-derived from the model definitions (softmax/sigmoid, group-limited top-k), and the layer is a
plain loop over experts and the (token, k) pairs routed to them.
"""

import ml_dtypes
import numpy as np

from tests import numpy_reference as npref


# ----------------------------------------------------------------------------- routing

def _topk_desc(scores: np.ndarray, k: int) -> np.ndarray:
  """Indices of the k largest per row, descending; equal scores: lower index first."""
  # A stable sort of the negated scores keeps equal elements in index order.
  return np.argsort(-scores, axis=-1, kind="stable")[..., :k]


def route(logits, top_k, *, scoring="softmax", renormalize=True, n_group=1, topk_group=1,
          group_score="top2_sum", routed_scaling_factor=1.0, correction_bias=None):
  """float64 routing of ``logits [M, E]``: returns (weights float64 [M, k], ids int64 [M, k])."""
  logits = np.asarray(logits, np.float64)
  m, e = logits.shape
  if scoring == "softmax":
    z = np.exp(logits - logits.max(axis=-1, keepdims=True))
    scores = z / z.sum(axis=-1, keepdims=True)
  else:
    scores = 1.0 / (1.0 + np.exp(-logits))
  choice = scores.copy()
  if correction_bias is not None:
    choice = choice + np.asarray(correction_bias, np.float64)
  ids = np.zeros((m, top_k), np.int64)
  for t in range(m):
    c = choice[t].copy()
    if n_group > 1:
      per = e // n_group
      groups = c.reshape(n_group, per)
      if group_score == "max" or per == 1:
        gscore = groups.max(axis=-1)
      else:
        gscore = np.sort(groups, axis=-1)[:, -2:].sum(axis=-1)
      keep = _topk_desc(gscore, topk_group)
      allowed = np.zeros(e, bool)
      for g in keep:
        allowed[g * per:(g + 1) * per] = True
      c = np.where(allowed, c, -np.inf)
    ids[t] = _topk_desc(c, top_k)
  weights = np.take_along_axis(scores, ids, axis=-1)
  if renormalize:
    weights = weights / weights.sum(axis=-1, keepdims=True)
  return weights * routed_scaling_factor, ids


# ----------------------------------------------------------------------------- activations

def silu(v):
  return v / (1.0 + np.exp(-v))


def activation(h, kind, *, limit=None, alpha=1.702):
  """float64 activation of h [..., N13] (gate rows first for gated kinds)."""
  h = np.asarray(h, np.float64)
  if kind == "relu2":
    return np.maximum(h, 0.0) ** 2
  i = h.shape[-1] // 2
  gate, up = h[..., :i], h[..., i:]
  if kind == "swiglu":
    a = silu(gate)
    if limit is not None:
      a = np.minimum(a, limit)
      up = np.clip(up, -limit, limit)
    return a * up
  if kind == "gptoss":
    g = np.minimum(gate, limit)
    u = np.clip(up, -limit, limit)
    return g / (1.0 + np.exp(-alpha * g)) * (u + 1.0)
  raise ValueError(kind)


# ----------------------------------------------------------------------------- alignment

def check_alignment(sorted_ids, block_expert, num_padded, topk_ids, num_experts, block_m,
                    expert_map=None):
  """Asserts every documented invariant of an alignment of ``topk_ids [M, k]``."""
  sorted_ids = np.asarray(sorted_ids)
  block_expert = np.asarray(block_expert)
  topk_ids = np.asarray(topk_ids)
  num_padded = int(np.asarray(num_padded).reshape(-1)[0])
  m, k = topk_ids.shape
  t = m * k
  sentinel = t
  p = len(sorted_ids)
  assert p % block_m == 0 and len(block_expert) == p // block_m
  nonempty = len(np.unique(topk_ids[(topk_ids >= 0) & (topk_ids < num_experts)]))
  assert p <= -(-(t + num_experts * (block_m - 1)) // block_m) * block_m
  assert p >= num_padded and num_padded % block_m == 0
  flat = topk_ids.reshape(-1)
  want_padded = sum(-(-np.sum(flat == ex) // block_m) * block_m for ex in range(num_experts))
  assert num_padded == want_padded
  assert (sorted_ids[num_padded:] == sentinel).all()
  assert (block_expert[num_padded // block_m:] == -1).all()
  used = sorted_ids[:num_padded]
  real = used[used != sentinel]
  valid_pairs = np.flatnonzero((flat >= 0) & (flat < num_experts))
  np.testing.assert_array_equal(np.sort(real), valid_pairs)  # each valid pair exactly once
  expected_blocks = []
  for ex in range(num_experts):
    pairs = np.flatnonzero(flat == ex)
    nblk = -(-len(pairs) // block_m)
    run = np.full(nblk * block_m, sentinel)
    run[:len(pairs)] = pairs  # ascending pair index within an expert
    expected_blocks.append((ex, run))
  got = used.reshape(-1, block_m)
  b = 0
  for ex, run in expected_blocks:
    for blk in run.reshape(-1, block_m):
      np.testing.assert_array_equal(got[b], blk)
      want_e = ex if expert_map is None else int(np.asarray(expert_map)[ex])
      assert block_expert[b] == want_e, (b, block_expert[b], want_e)
      b += 1
  assert b * block_m == num_padded
  assert nonempty <= num_experts


# ----------------------------------------------------------------------------- the layer

def dequantize_experts(w):
  """float64 [E, N, K] of a stacked NVFP4Weight (checkpoint layout)."""
  return npref.dequantize(np.asarray(w.packed), np.asarray(w.scales), np.asarray(w.global_scale))


def moe(x, w13, w2, topk_weights, topk_ids, *, activation_kind="swiglu", limit=None,
        alpha=1.702, b13=None, b2=None, expert_map=None, round_dtype=None,
        gemm1_rounded=True):
  """float64 MoE layer: out[t] = sum_j w[t,j] * (act(W13[e] x[t] + b13[e]) W2[e]^T + b2[e]).

  ``w13 [E, N13, H]`` and ``w2 [E, H, I]`` are float64 arrays; ``topk_ids`` are global ids,
  mapped through ``expert_map`` (pairs of -1 experts contribute zero). ``round_dtype`` (e.g.
  ml_dtypes.bfloat16) rounds the activation's output and each GEMM2 row (after the top-k
  weight) at the points the implementation documents, and with ``gemm1_rounded`` (default)
  GEMM1's output before the activation too (False: fused_moe with a w13 prepared with
  gate_up_pairs, whose GEMM1 applies the activation); None keeps everything float64.
  """
  x = np.asarray(x, np.float64)
  topk_ids = np.asarray(topk_ids)
  topk_weights = np.asarray(topk_weights, np.float64)
  rnd = (lambda v: v) if round_dtype is None else (
      lambda v: np.asarray(v, np.float64).astype(round_dtype).astype(np.float64))
  m, h = x.shape
  out = np.zeros((m, h), np.float64)
  n_global = len(expert_map) if expert_map is not None else w13.shape[0]
  for e in range(n_global):
    local = e if expert_map is None else int(expert_map[e])
    if local < 0:
      continue
    tok, j = np.nonzero(topk_ids == e)
    if len(tok) == 0:
      continue
    hid = x[tok] @ w13[local].T
    if b13 is not None:
      hid = hid + b13[local]
    act = rnd(activation(rnd(hid) if gemm1_rounded else hid, activation_kind, limit=limit,
                         alpha=alpha))
    y = act @ w2[local].T
    if b2 is not None:
      y = y + b2[local]
    y = rnd(y * topk_weights[tok, j][:, None])
    np.add.at(out, tok, y)
  return out


def rel_l2(a, b):
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def bf16(v):
  return np.asarray(v).astype(ml_dtypes.bfloat16)
