"""Runs the routing + alignment kernel over its range; meant to be run under compute-sanitizer
(memcheck and racecheck: the kernel reuses one shared-memory region for routing and alignment).

  python benchmarks/sanitize_route.py

Cases: one token; a full block (1024 pairs, DeepSeek-like groups and bias); 1024 experts with
top-32 (the fewest warps that fit); bf16 logits with an expert map; E not a multiple of 32."""
import jax
import jax.numpy as jnp
import numpy as np

import jax_nvfp4 as nf
from jax_nvfp4.ops import moe_route

rng = np.random.default_rng(0)
deepseek = dict(top_k=8, scoring="sigmoid", n_group=8, topk_group=4, routed_scaling_factor=2.5)
for m, e, kw, dtype, mapped in [(1, 128, dict(top_k=8), jnp.float32, False),
                                (128, 256, deepseek, jnp.float32, False),
                                (32, 1024, dict(top_k=32), jnp.float32, False),
                                (9, 256, deepseek, jnp.bfloat16, True),
                                (5, 40, dict(top_k=3, renormalize=False), jnp.float16, False)]:
  assert moe_route.fits_one_block(m, e, kw["top_k"], kw.get("n_group", 1))
  bias = (jnp.asarray(rng.uniform(-0.3, 0.3, e), jnp.float32)
          if kw.get("scoring") == "sigmoid" else None)
  cfg = nf.RoutingConfig(correction_bias=bias, **kw)
  emap = jnp.asarray(np.where(np.arange(e) % 3 == 0, -1, np.arange(e) // 2), jnp.int32) \
      if mapped else None
  logits = jnp.asarray(rng.standard_normal((m, e)) * 2, dtype)
  w, ids, al = jax.jit(nf.route_and_align, static_argnames="block_m")(logits, cfg, 8, emap)
  rw, rids = nf.route(logits, cfg)
  same = bool((np.asarray(ids) == np.asarray(rids)).all())
  print(m, e, kw["top_k"], dtype.__name__, "ids equal XLA's:", same,
        "padded", int(al.num_padded[0]))
  assert same
