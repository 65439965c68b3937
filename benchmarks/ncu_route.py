"""A routing + alignment launch to profile alone (not a test; run under ncu on a GPU):

  ncu -k regex:moe_route --launch-skip 3 --launch-count 1 python benchmarks/ncu_route.py [qwen3|deepseek] [T]

Standalone duration and stall reasons of csrc/nvfp4_moe_route.cu, to compare with its duration
inside the layer (profile_moe.py)."""
import sys

import jax
import jax.numpy as jnp

import jax_nvfp4 as nf
from jax_nvfp4.bench import moe as bench_moe

name = sys.argv[1] if len(sys.argv) > 1 else "qwen3"
tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 1
e, k = {"qwen3": (128, 8), "deepseek": (256, 8), "mixtral": (8, 2)}[name]
routing = bench_moe.routing_for(e, k)
logits = jax.random.normal(jax.random.key(0), (tokens, e), jnp.float32)
f = jax.jit(lambda l: nf.route_and_align(l, routing, 8))
for _ in range(6):
  jax.block_until_ready(f(logits))
print(name, tokens, "done")
