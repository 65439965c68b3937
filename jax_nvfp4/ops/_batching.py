"""A vmap helper shared by the primitives' batching rules."""

import jax.numpy as jnp


def batch_dim_first(args, dims):
  """``(size, args)`` with every operand's batch dim moved to 0; unbatched operands (dim None)
  are broadcast to the batch size."""
  size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
  return size, [jnp.broadcast_to(a, (size, *a.shape)) if d is None else jnp.moveaxis(a, d, 0)
                for a, d in zip(args, dims)]
