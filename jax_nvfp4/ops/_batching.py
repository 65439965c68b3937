"""vmap helpers shared by the primitives' batching rules."""

import jax
import jax.numpy as jnp


def batch_dim_first(args, dims):
  """``(size, args)`` with every operand's batch dim moved to 0; unbatched operands (dim None)
  are broadcast to the batch size."""
  size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
  return size, [jnp.broadcast_to(a, (size, *a.shape)) if d is None else jnp.moveaxis(a, d, 0)
                for a, d in zip(args, dims)]


def map_unless_weights_batched(primitive, weight_operands, what):
  """A batching rule that runs ``primitive`` once per batch element (``lax.map`` over the
  batched operands) over shared weights; batched weights (``weight_operands``, indices) raise
  ``NotImplementedError`` naming ``what``."""
  def rule(args, dims, **params):
    if any(dims[i] is not None for i in weight_operands):
      raise NotImplementedError(f"{primitive.name}: vmap over the expert weights ({what}) is "
                                "not supported; stack experts along E")
    mapped = [i for i, d in enumerate(dims) if d is not None]
    batched = tuple(jnp.moveaxis(args[i], dims[i], 0) for i in mapped)

    def one(ops):
      full = list(args)
      for i, a in zip(mapped, ops):
        full[i] = a
      return primitive.bind(*full, **params)

    return jax.lax.map(one, batched), 0
  return rule
