"""MoE expert activations (plain jnp, so XLA fuses them between the two grouped GEMMs).

Our fused gate/up weight ``w13`` is ``[E, 2I, H]`` with the gate rows first: GEMM1's output
``h[..., :I]`` is the gate and ``h[..., I:2I]`` the up projection. Non-gated activations
(``relu2``) use ``w13`` ``[E, I, H]`` and ``h[..., :I]``.

* ``"swiglu"``: ``silu(gate) * up``; with a clamp ``limit`` L (DeepSeek-V4 ``swiglu_limit``):
  ``min(silu(gate), L) * clamp(up, -L, L)`` (the clamp comes after the SiLU).
* ``"gptoss"`` (limit L required, gpt-oss uses ``alpha = 1.702``, ``L = 7``):
  ``g = min(gate, L); u = clamp(up, -L, L); g * sigmoid(alpha * g) * (u + 1)``.
* ``"relu2"`` (Nemotron, non-gated): ``relu(h)^2``.

gpt-oss checkpoints *interleave* gate and up rows (gate of row i at 2i, up at 2i+1). Loaders must
convert them with ``deinterleave_gate_up`` (weights and biases) before calling ``fused_moe``;
nothing in ``fused_moe`` detects or undoes an interleaved layout.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_nvfp4.format import NVFP4Weight
from jax_nvfp4.prepare import TILE_N, interleave_gate_up

ACTIVATIONS = ("swiglu", "gptoss", "relu2")
GATED = {"swiglu": True, "gptoss": True, "relu2": False}
GPTOSS_ALPHA = 1.702
GPTOSS_LIMIT = 7.0


def is_gated(activation: str) -> bool:
  """Whether ``activation`` consumes a ``[gate; up]`` pair (w13 has 2I rows) or not (I rows)."""
  if activation not in GATED:
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
  return GATED[activation]


def swiglu(gate: jax.Array, up: jax.Array, limit: float | None = None) -> jax.Array:
  """``silu(gate) * up``, or ``min(silu(gate), limit) * clip(up, -limit, limit)``."""
  a = jax.nn.silu(gate)
  if limit is not None:
    a = jnp.minimum(a, limit)
    up = jnp.clip(up, -limit, limit)
  return a * up


def gptoss_glu(gate: jax.Array, up: jax.Array, limit: float = GPTOSS_LIMIT,
               alpha: float = GPTOSS_ALPHA) -> jax.Array:
  """``g * sigmoid(alpha * g) * (u + 1)`` with ``g = min(gate, limit)``,
  ``u = clip(up, -limit, limit)``."""
  g = jnp.minimum(gate, limit)
  u = jnp.clip(up, -limit, limit)
  return g * jax.nn.sigmoid(alpha * g) * (u + 1.0)


def relu2(h: jax.Array) -> jax.Array:
  """``relu(h) ** 2``."""
  r = jnp.maximum(h, 0.0)
  return r * r


def gate_up_halves(h: jax.Array, intermediate_size: int, pairs: bool = False):
  """(gate, up) ``[..., I]`` of GEMM1's output: ``h[..., :I]`` and ``h[..., I:2I]``, or with
  ``pairs`` (a w13 prepared with ``gate_up_pairs``) the first and second 8 of every 16
  columns."""
  i = intermediate_size
  if pairs:  # back to [gate; up]: prepare() wrote the pairs with this permutation
    h = interleave_gate_up(h[..., :2 * i], h.ndim - 1, 2 * i // TILE_N, inverse=True)
  return h[..., :i], h[..., i:2 * i]


def apply_activation(h: jax.Array, activation: str, *, intermediate_size: int | None = None,
                     limit: float | None = None, alpha: float = GPTOSS_ALPHA,
                     dtype=None, gate_up_pairs: bool = False) -> jax.Array:
  """Applies ``activation`` to GEMM1's output ``h [..., N13]`` in float32.

  Args:
    h: float ``[..., N13]``; for gated activations the gate is ``h[..., :I]`` and up is
      ``h[..., I:2I]`` (our ``[gate; up]`` layout), for ``relu2`` the input is ``h[..., :I]``.
    activation: ``"swiglu"``, ``"gptoss"`` or ``"relu2"`` (formulas: the module docstring).
    intermediate_size: I; defaults to ``N13 // 2`` (gated) or ``N13`` (relu2). Columns past
      ``2I`` (gated) or ``I`` are ignored, so a row padded past the logical size works too.
    limit: the clamp L (optional for swiglu, required for gptoss, refused for relu2).
    alpha: gpt-oss's sigmoid slope.
    dtype: the result dtype (default: ``h.dtype``).
    gate_up_pairs: gated ``h`` comes from a w13 prepared with ``gate_up_pairs`` (``I`` a
      multiple of 8; ``gate_up_halves``).

  Returns ``[..., I]`` in ``dtype``.
  """
  gated = is_gated(activation)
  n13 = h.shape[-1]
  i = intermediate_size if intermediate_size is not None else (n13 // 2 if gated else n13)
  need = 2 * i if gated else i
  if n13 < need or (gated and intermediate_size is None and n13 % 2):
    raise ValueError(f"apply_activation: {activation!r} needs {need} columns "
                     f"({'[gate; up] of ' if gated else ''}I = {i}), got h[..., {n13}]")
  if activation == "relu2" and limit is not None:
    raise ValueError("apply_activation: relu2 takes no limit")
  if activation == "gptoss" and limit is None:
    raise ValueError(f"apply_activation: gptoss needs a limit (gpt-oss uses {GPTOSS_LIMIT})")
  if gated and gate_up_pairs and i % 8:
    raise ValueError(f"apply_activation: gate_up_pairs needs I % 8 == 0, got I = {i}")
  dtype = h.dtype if dtype is None else dtype
  h = h.astype(jnp.float32)
  if activation == "relu2":
    return relu2(h[..., :i]).astype(dtype)
  gate, up = gate_up_halves(h, i, gate_up_pairs)
  if activation == "swiglu":
    out = swiglu(gate, up, limit)
  else:
    out = gptoss_glu(gate, up, limit, alpha)
  return out.astype(dtype)


def deinterleave_gate_up(w, axis: int = -2):
  """Converts interleaved gate/up rows (gate row i at ``2i``, up row i at ``2i+1``, gpt-oss's
  HF layout) into our ``[gate; up]`` layout along ``axis``.

  ``w`` is an ``NVFP4Weight`` (logical ``[..., 2I, H]``; rows move with their packed bytes and
  block scales, the per-expert global scale is unchanged; ``axis`` must be the N axis, -2) or an
  array of any dtype (e.g. a float bias ``[E, 2I]`` with ``axis=-1``). Returns the same kind,
  shape and dtype. Exact (a permutation).
  """
  def perm(a, ax):
    size = a.shape[ax]
    if size % 2:
      raise ValueError(f"deinterleave_gate_up: axis {ax} has odd size {size}; interleaved "
                       "gate/up needs 2I")
    return jnp.concatenate([jax.lax.slice_in_dim(a, 0, size, 2, axis=ax),
                            jax.lax.slice_in_dim(a, 1, size, 2, axis=ax)], axis=ax)

  if isinstance(w, NVFP4Weight):
    if axis not in (-2, len(w.shape) - 2):
      raise ValueError(f"deinterleave_gate_up: an NVFP4Weight's gate/up rows are its N axis "
                       f"(-2), got axis={axis}")
    return NVFP4Weight(perm(w.packed, -2), perm(w.scales, -2), w.global_scale, dtype=w.dtype)
  return perm(jnp.asarray(w), axis)
