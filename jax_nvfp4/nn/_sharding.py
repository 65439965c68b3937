"""Sharding helpers of the NNX and Linen layers: the mesh in context, eager placement, and the
checks and layouts behind ``kernel_sharding`` (dense) and ``expert_axis`` / ``tensor_axis`` (MoE).
"""

from __future__ import annotations

import jax
import numpy as np

from jax_nvfp4.parallel import dense as parallel_dense
from jax_nvfp4.parallel import moe as parallel_moe


def context_mesh():
  """The mesh in context (``jax.set_mesh``), as an ``AbstractMesh``, or None."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty else mesh


def on_mesh(a, spec):
  """``a`` for a variable with ``out_sharding=spec``: a concrete array not yet laid out on a
  mesh (e.g. a weight loaded before ``jax.set_mesh``) is put on the concrete mesh in context
  with ``spec``; nnx's eager sharding only constrains arrays that are already on the mesh.
  Tracers, arrays with a ``NamedSharding`` and calls without a mesh are left alone."""
  if spec is None or isinstance(a, jax.core.Tracer):
    return a
  if isinstance(getattr(a, "sharding", None), jax.sharding.NamedSharding):
    return a
  try:
    mesh = jax.sharding.get_mesh()
  except ValueError:  # under a trace (jit, eval_shape): the constraint applies to a traced value
    return a
  if mesh.empty:
    return a
  return jax.device_put(a, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec)))


def variable(cls, value, spec):
  """``cls(value)`` (an ``nnx.Variable`` class) with ``out_sharding=spec`` metadata when
  ``spec`` is not None, the value put on the mesh in context first (``on_mesh``)."""
  if spec is None:
    return cls(value)
  return cls(on_mesh(value, spec), out_sharding=tuple(spec))


def placed_like(value, current):
  """``value`` (replacing a variable's ``current`` value) with ``current``'s ``NamedSharding``
  when both are concrete, so that setting a loaded array keeps the variable's layout."""
  sharding = getattr(current, "sharding", None)
  if (isinstance(value, jax.core.Tracer) or isinstance(current, jax.core.Tracer)
      or not isinstance(sharding, jax.sharding.NamedSharding)):
    return value
  return jax.device_put(value, sharding)


def _axes_size(mesh, entry) -> int:
  axes = () if entry is None else tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)
  for a in axes:
    if a not in mesh.shape:
      raise ValueError(f"{a!r} is not an axis of the mesh {dict(mesh.shape)}")
  return int(np.prod([mesh.shape[a] for a in axes], dtype=np.int64))


def check_dense_sharding(kernel_sharding, bias_sharding, n: int, k: int, prepared: bool,
                         who: str) -> None:
  """With a mesh in context: ``ValueError`` unless the ``[N, K]`` weight splits into whole
  blocks as ``kernel_sharding`` names (``jax_nvfp4.parallel.check_weight_split``: N per shard a
  whole number, or whole 16-row tiles in the kernel layout; K per shard whole 16-column scale
  blocks, or 64-column chunks) and the ``[N]`` bias splits evenly. Without a mesh, nothing to
  check (the sizes are unknown)."""
  mesh = context_mesh()
  if mesh is None:
    return
  try:
    if kernel_sharding is not None:
      ks = tuple(kernel_sharding)
      parallel_dense.check_weight_split(n, k, mesh, prepared=prepared, n_axis=ks[0],
                                        k_axis=ks[1], who="kernel_sharding")
    if bias_sharding is not None:
      size = _axes_size(mesh, tuple(bias_sharding)[0])
      if n % size:
        raise ValueError(f"bias_sharding {tuple(bias_sharding)!r} splits the bias [N = {n}] "
                         f"into {size} pieces: N must be a multiple of {size}")
  except ValueError as e:
    raise ValueError(f"{who}: {e}") from None


def moe_sharding(expert_axis, tensor_axis, *, num_experts: int, intermediate_size: int,
                 prepared: bool, gated: bool, who: str):
  """Sharding of an MoE layer created with ``expert_axis`` / ``tensor_axis``: returns
  ``(specs, gate_up_shards)``, ``specs`` from ``jax_nvfp4.parallel.moe_state_specs`` (None when
  neither axis is given) and ``gate_up_shards`` the tensor-axis size ``tp`` that w13's rows and
  bias are stored for (``[gate_0; up_0; ...]``, see ``parallel.gate_up_per_shard``; 1 = ``[gate;
  up]``; a ``gate_up_pairs`` w13 is that order already, only its bias is reordered).

  With a mesh in context the split is checked (``parallel.check_moe_split``). A gated layer with
  a ``tensor_axis`` needs that mesh (its size decides the stored row order).
  """
  if expert_axis is None and tensor_axis is None:
    return None, 1
  mesh = context_mesh()
  if mesh is None:
    if tensor_axis is not None and gated:
      raise ValueError(f"{who}: tensor_axis with a gated activation needs the mesh in context "
                       "(jax.set_mesh) when the layer is created: w13's [gate; up] rows are "
                       "stored in per-shard order [gate_0; up_0; gate_1; up_1; ...], which "
                       "depends on the tensor axis size")
    tp = 1
  else:
    _, tp = parallel_moe.check_moe_split(mesh, num_experts, intermediate_size,
                                         prepared=prepared, expert_axis=expert_axis,
                                         tensor_axis=tensor_axis, who=who)
  specs = parallel_moe.moe_state_specs(prepared=prepared, expert_axis=expert_axis,
                                       tensor_axis=tensor_axis)
  return specs, (tp if gated else 1)


def sharded_moe_weights(w13, w2, b13, b2, *, expert_axis, tensor_axis, gated: bool,
                        gate_up_shards: int, who: str):
  """A ``ShardedMoEWeights`` over the mesh in context for a layer's stored weights, or None
  when the layer runs on one device (no axes, no mesh, or axes of total size 1). ``ValueError``
  when the mesh's tensor axis size is not the one w13's rows and bias were stored for. A w13 in
  ``gate_up_pairs`` order goes as it is (its flag kept): each tensor shard's whole tiles are its
  own gate/up pairs, and the stored bias is already per shard (``parallel.gate_up_per_shard``),
  so every device fuses the activation into its GEMM 1."""
  mesh = context_mesh()
  if (expert_axis is None and tensor_axis is None) or mesh is None:
    return None
  try:
    ep, tp = _axes_size(mesh, expert_axis), _axes_size(mesh, tensor_axis)
  except ValueError as e:
    raise ValueError(f"{who}: {e}") from None
  if ep * tp == 1:
    return None
  if gated and tp != gate_up_shards:
    raise ValueError(f"{who}: w13 and its bias are stored for a tensor axis of size "
                     f"{gate_up_shards} (per-shard [gate_t; up_t] order; the rows of a "
                     f"gate_up_pairs w13 keep their own order, its bias does not), but "
                     f"{tensor_axis!r} has size {tp} in the mesh in context; create the layer "
                     "under this mesh")
  axes = lambda e: () if e is None else tuple(e) if isinstance(e, (tuple, list)) else (e,)
  return parallel_moe.ShardedMoEWeights(w13, w2, b13, b2, mesh=mesh,
                                        expert_axis=axes(expert_axis),
                                        tensor_axis=axes(tensor_axis), gated=gated)
