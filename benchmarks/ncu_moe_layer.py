"""One MoE layer, repeated, to profile its grouped GEMMs under ncu (not a test; GPU only):

  ncu -k regex:nvfp4_kernel --launch-skip 4 --launch-count 2 \
      python benchmarks/ncu_moe_layer.py [qwen3|deepseek|mixtral] [T]

The layer runs 4 times, two GEMMs each: --launch-skip 4 --launch-count 2 are GEMM 1 and 2 of
the third execution (compiled, caches as the layer leaves them when ncu does not flush)."""
import sys

import jax
import jax.numpy as jnp

from jax_nvfp4.bench import moe as bench_moe

name = sys.argv[1] if len(sys.argv) > 1 else "qwen3"
tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 1
e, h, inter, k = {"qwen3": (128, 2048, 768, 8), "deepseek": (256, 7168, 2048, 8),
                  "mixtral": (8, 4096, 14336, 2)}[name]
routing = bench_moe.routing_for(e, k)
kw, k2, kx, kl = jax.random.split(jax.random.key(0), 4)
w13 = bench_moe.random_prepared(kw, e, 2 * inter, h)
w2 = bench_moe.random_prepared(k2, e, h, inter)
x = jax.random.normal(kx, (tokens, h), jnp.bfloat16)
logits = jax.random.normal(kl, (tokens, e), jnp.float32)
f = jax.jit(bench_moe.nvfp4_layer(routing))
for _ in range(4):
  jax.block_until_ready(f(x, logits, w13, w2))
print(name, tokens, "done")
