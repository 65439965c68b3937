"""The demo's embedded model: a small decoder stack in plain JAX, bf16 or NVFP4.

``DemoConfig`` describes it; ``init_params`` makes seeded random bf16 weights; ``quantize_params``
turns every Linear weight into NVFP4 (embedding, norms, routers and lm_head stay as they are, as
the checkpoint tools leave them) and ``prepare_params`` repacks them for the CUDA kernels;
``forward`` runs any such tree and picks the op per weight: a plain bf16 dot for an array,
``nvfp4_matmul`` / ``fused_moe`` for an NVFP4 weight.

Block ``i`` (pre-norm residual)::

  x = x + o(attention(q(n1), k(n1), v(n1)))          n1 = rms_norm(x) * attn_norm
  x = x + mlp(n2)                                    n2 = rms_norm(x) * mlp_norm

with causal multi-head softmax attention (no positional encoding: causality alone orders the
tokens, which is enough to exercise the Linears), and ``mlp`` alternating between a dense SwiGLU
``down(silu(gate(h)) * up(h))`` (even ``i``) and an MoE (odd ``i``): softmax top-k routing with
renormalized weights, experts ``w13 [E, 2I, H]`` (rows ``[gate; up]``) and ``w2 [E, H, I]``,
SwiGLU with the DeepSeek-V4 clamp ``min(silu(gate), L) * clip(up, -L, L)``. After the last block
a final RMSNorm and an unquantized ``lm_head`` give float32 logits.

Activations are bf16; every matmul accumulates in float32 and rounds its output to bf16 (the
NVFP4 ops do the same), so the two trees differ by the weight quantization only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jax_nvfp4.format import NVFP4Weight, dequantize, quantize
from jax_nvfp4.moe import RoutingConfig, apply_activation, route
from jax_nvfp4.ops.dense import nvfp4_matmul
from jax_nvfp4.ops.moe import fused_moe
from jax_nvfp4.prepare import PreparedNVFP4Weight, prepare

ATTN_LINEARS = ("q", "k", "v", "o")
DENSE_LINEARS = ("gate", "up", "down")
MOE_LINEARS = ("w13", "w2")
LINEARS = ATTN_LINEARS + DENSE_LINEARS + MOE_LINEARS
_QUANTIZED = (NVFP4Weight, PreparedNVFP4Weight)


@dataclasses.dataclass(frozen=True)
class DemoConfig:
  """Sizes of the demo model (all static).

  ``intermediate`` (I) is the dense MLP's and every expert's; it must be a multiple of 16 (the
  K of down/w2) and need not be one of 64 (the default 1008 is not: the kernels pad it).
  """

  blocks: int = 2
  hidden: int = 512
  intermediate: int = 1008
  heads: int = 8
  experts: int = 8
  top_k: int = 2
  limit: float = 7.0
  vocab: int = 2048
  eps: float = 1e-6

  def validate(self) -> None:
    """Raises ValueError naming the field and what it must be."""
    for name in ("blocks", "hidden", "intermediate", "heads", "experts", "top_k", "vocab"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    for name in ("hidden", "intermediate"):
      if getattr(self, name) % 16:
        raise ValueError(f"{name} must be a multiple of 16 (the NVFP4 block size along K), got "
                         f"{getattr(self, name)}")
    if self.hidden % self.heads:
      raise ValueError(f"hidden ({self.hidden}) must be a multiple of heads ({self.heads})")
    if self.top_k > self.experts:
      raise ValueError(f"top_k ({self.top_k}) must be <= experts ({self.experts})")
    if not self.limit > 0:
      raise ValueError(f"limit must be > 0, got {self.limit}")

  def is_moe(self, block: int) -> bool:
    """Odd blocks hold the MoE, even ones the dense MLP."""
    return block % 2 == 1

  def linear_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
    """``(path, [..., N, K])`` of every Linear weight that ``quantize_params`` quantizes."""
    h, i, e = self.hidden, self.intermediate, self.experts
    out = []
    for b in range(self.blocks):
      out += [(f"blocks.{b}.{n}", (h, h)) for n in ATTN_LINEARS]
      if self.is_moe(b):
        out += [(f"blocks.{b}.w13", (e, 2 * i, h)), (f"blocks.{b}.w2", (e, h, i))]
      else:
        out += [(f"blocks.{b}.gate", (i, h)), (f"blocks.{b}.up", (i, h)),
                (f"blocks.{b}.down", (h, i))]
    return out


def init_params(config: DemoConfig, seed: int = 0) -> dict:
  """Seeded random weights: Linears bf16 ``[N, K]`` ~ N(0, 1/K); norms float32 around 1;
  embedding and lm_head bf16 ``[vocab, hidden]``; routers float32 ``[E, H]``."""
  config.validate()
  keys = iter(jax.random.split(jax.random.key(seed), 12 * config.blocks + 4))
  h = config.hidden

  def linear(*shape):
    w = jax.random.normal(next(keys), shape, jnp.float32) / np.sqrt(shape[-1])
    return w.astype(jnp.bfloat16)

  def norm():
    return 1.0 + 0.1 * jax.random.normal(next(keys), (h,), jnp.float32)

  blocks = []
  for b in range(config.blocks):
    blk = {"attn_norm": norm(), "mlp_norm": norm()}
    blk.update({n: linear(h, h) for n in ATTN_LINEARS})
    i, e = config.intermediate, config.experts
    if config.is_moe(b):
      # A router with spread-out logits so that top-k picks differ from token to token.
      blk["router"] = 2.0 * jax.random.normal(next(keys), (e, h), jnp.float32) / np.sqrt(h)
      blk["w13"] = linear(e, 2 * i, h)
      blk["w2"] = linear(e, h, i)
    else:
      blk.update(gate=linear(i, h), up=linear(i, h), down=linear(h, i))
    blocks.append(blk)
  return {"embed": jax.random.normal(next(keys), (config.vocab, h), jnp.bfloat16),
          "blocks": blocks, "final_norm": norm(), "lm_head": linear(config.vocab, h)}


def map_linears(params: dict, fn: Callable, *,
                progress: Callable[[str], None] | None = None) -> dict:
  """Copy of ``params`` with ``fn`` applied to every Linear weight (``LINEARS``: attention,
  dense MLP, experts) and nothing else; ``progress(message)`` is called once per block."""
  blocks = []
  for b, blk in enumerate(params["blocks"]):
    if progress is not None:
      progress(f"block {b + 1}/{len(params['blocks'])}")
    blocks.append({name: fn(w) if name in LINEARS else w for name, w in blk.items()})
  return {**params, "blocks": blocks}


def quantize_params(params: dict, **kw) -> dict:
  """Every Linear weight quantized by ``jax_nvfp4.quantize`` (stacked experts: one global scale
  per expert, shared by its gate and up rows); embedding, norms, routers, lm_head unchanged."""
  return map_linears(params, jax.jit(quantize), **kw)


def prepare_params(qparams: dict, **kw) -> dict:
  """Every NVFP4 Linear weight repacked by ``prepare`` for the CUDA kernels."""
  return map_linears(qparams, jax.jit(prepare), **kw)


def dequantize_params(qparams: dict) -> dict:
  """Every NVFP4 Linear weight dequantized to bf16 (same model, plain-JAX arithmetic)."""
  return map_linears(qparams, jax.jit(lambda w: dequantize(w, jnp.bfloat16)))


def weight_bytes(params: dict) -> tuple[int, int]:
  """(bytes of the quantized-or-not Linear weights, bytes of everything else) held by
  ``params`` (an NVFP4 weight counts its packed codes, block scales and global scales)."""
  linear = other = 0
  for blk in params["blocks"]:
    for name, w in blk.items():
      if name in LINEARS:
        linear += w.nbytes
      else:
        other += w.nbytes
  other += sum(params[n].nbytes for n in ("embed", "final_norm", "lm_head"))
  return int(linear), int(other)


def weight_error(params: dict, qparams: dict) -> float:
  """rel-L2 of all Linear weights together: ``||dequantize(q) - w|| / ||w||`` over every
  Linear of ``params`` and its NVFP4 version in ``qparams`` (float32 sums)."""
  err = ref = 0.0
  for blk, qblk in zip(params["blocks"], qparams["blocks"]):
    for name in LINEARS:
      if name in blk:
        w = blk[name].astype(jnp.float32)
        d = dequantize(qblk[name], jnp.float32) - w
        err += float(jnp.sum(d * d))
        ref += float(jnp.sum(w * w))
  return float(np.sqrt(err / ref))


# ----------------------------------------------------------------------------- forward

def _linear(x, w):
  """``x [..., K] @ w.T`` -> ``[..., N]`` in x.dtype, float32 accumulation."""
  if isinstance(w, _QUANTIZED):
    return nvfp4_matmul(x, w)
  return jnp.dot(x, w.T, preferred_element_type=jnp.float32).astype(x.dtype)


def _rms_norm(x, weight, eps):
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (x32 * weight).astype(x.dtype)


def _attention(h, blk, config):
  t = h.shape[0]
  hd = config.hidden // config.heads
  q, k, v = (_linear(h, blk[n]).reshape(t, config.heads, hd) for n in ("q", "k", "v"))
  scores = jnp.einsum("qhd,khd->hqk", q, k, preferred_element_type=jnp.float32) / np.sqrt(hd)
  causal = jnp.tril(jnp.ones((t, t), bool))
  probs = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1)
  out = jnp.einsum("hqk,khd->qhd", probs, v.astype(jnp.float32)).astype(h.dtype)
  return _linear(out.reshape(t, config.hidden), blk["o"])


def dense_mlp(h, gate, up, down):
  """SwiGLU MLP ``down(silu(gate(h)) * up(h))``; weights ``[I, H]``, ``[I, H]``, ``[H, I]``
  (bf16 arrays or NVFP4)."""
  g, u = _linear(h, gate), _linear(h, up)
  act = (jax.nn.silu(g.astype(jnp.float32)) * u.astype(jnp.float32)).astype(h.dtype)
  return _linear(act, down)


def moe(h, router, w13, w2, *, top_k: int, limit: float | None = None,
        renormalize: bool = True):
  """MoE layer on ``h [T, H]``: float32 router logits ``h @ router.T`` (router ``[E, H]``),
  softmax top-k (weights renormalized when ``renormalize``), SwiGLU experts (clamped at
  ``limit`` when given) with ``w13 [E, 2I, H]`` (rows ``[gate; up]``) and ``w2 [E, H, I]``.
  NVFP4 experts run ``fused_moe``; bf16 arrays the plain-JAX baseline below."""
  logits = h.astype(jnp.float32) @ router.astype(jnp.float32).T          # [T, E]
  routing = RoutingConfig(top_k=top_k, renormalize=renormalize)
  if isinstance(w13, _QUANTIZED):
    return fused_moe(h, w13, w2, router_logits=logits, routing=routing, activation="swiglu",
                     limit=limit)
  # bf16 baseline: every expert on every token (reads each expert's weight once, as a grouped
  # GEMM does when all experts are hit), then the top-k rows are picked and weighted.
  weights, ids = route(logits, routing)                                  # [T, k]
  g = jnp.einsum("th,enh->ten", h, w13, preferred_element_type=jnp.float32)
  a = apply_activation(g.astype(h.dtype), "swiglu", limit=limit, dtype=h.dtype)
  y = jnp.einsum("tei,ehi->teh", a, w2, preferred_element_type=jnp.float32)
  picked = jnp.take_along_axis(y.astype(h.dtype), ids[:, :, None], axis=1)   # [T, k, H]
  return jnp.sum(picked.astype(jnp.float32) * weights[..., None], axis=1).astype(h.dtype)


def forward(params: dict, tokens: jax.Array, config: DemoConfig, *,
            with_routes: bool = False) -> tuple[jax.Array, ...]:
  """Runs the model on ``tokens`` (int ``[T]``, one sequence).

  Returns ``(hidden, logits)``: the final normed hidden states bf16 ``[T, hidden]`` and the
  logits float32 ``[T, vocab]``; with ``with_routes`` also the top-k expert ids int32 ``[B, T,
  top_k]`` of the B MoE blocks (``route`` of each router's logits, sorted per token): two models
  whose outputs differ by rounding can still pick different experts for a token, which moves
  their outputs far more. ``config`` and ``with_routes`` are static (close over them or pass them
  with ``functools.partial`` before ``jax.jit``).
  """
  x = params["embed"][tokens]
  routes = []
  for b, blk in enumerate(params["blocks"]):
    x = x + _attention(_rms_norm(x, blk["attn_norm"], config.eps), blk, config)
    n2 = _rms_norm(x, blk["mlp_norm"], config.eps)
    if config.is_moe(b):
      if with_routes:
        logits = n2.astype(jnp.float32) @ blk["router"].astype(jnp.float32).T
        routes.append(jnp.sort(route(logits, RoutingConfig(top_k=config.top_k))[1], axis=-1))
      x = x + moe(n2, blk["router"], blk["w13"], blk["w2"], top_k=config.top_k,
                  limit=config.limit)
    else:
      x = x + dense_mlp(n2, blk["gate"], blk["up"], blk["down"])
  x = _rms_norm(x, params["final_norm"], config.eps)
  logits = jnp.dot(x, params["lm_head"].T, preferred_element_type=jnp.float32)
  if with_routes:
    ids = (jnp.stack(routes) if routes
           else jnp.zeros((0, tokens.shape[0], config.top_k), jnp.int32))
    return x, logits, ids
  return x, logits
