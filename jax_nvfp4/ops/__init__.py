"""JAX primitives of jax_nvfp4 (one file per op: checks, abstract eval, lowering, batching)."""
