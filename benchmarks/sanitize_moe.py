"""Runs the grouped MoE kernel on a few awkward shapes; meant to be run under compute-sanitizer."""
import jax
import jax.numpy as jnp
import numpy as np

import jax_nvfp4 as nf

rng = np.random.default_rng(0)
# (tokens, hidden, intermediate, experts, top_k): sizes off the tile, T = 1, empty experts.
for m, h, i, e, k in [(1, 256, 176, 5, 2), (37, 128, 48, 12, 3), (130, 192, 96, 4, 2)]:
  for dtype in (jnp.bfloat16, jnp.float16):
    w13 = nf.prepare(nf.quantize(jnp.asarray(rng.standard_normal((e, 2 * i, h)) * 0.1, jnp.float32)))
    w2 = nf.prepare(nf.quantize(jnp.asarray(rng.standard_normal((e, h, i)) * 0.1, jnp.float32)))
    x = jnp.asarray(rng.standard_normal((m, h)), dtype)
    logits = jnp.asarray(rng.standard_normal((m, e)), jnp.float32)
    out = jax.jit(lambda x, l: nf.fused_moe(x, w13, w2, router_logits=l, top_k=k))(x, logits)
    cpu = jax.devices("cpu")[0]  # the reference lowering, on the host
    xc, w13c, w2c, lc = jax.device_put((x, nf.unprepare(w13), nf.unprepare(w2), logits), cpu)
    ref = jnp.asarray(np.asarray(nf.fused_moe(xc, w13c, w2c, router_logits=lc, top_k=k,
                                            backend="reference")))
    err = float(jnp.linalg.norm((out - ref).astype(jnp.float32)) /
                jnp.linalg.norm(ref.astype(jnp.float32)))
    print(m, h, i, e, k, dtype.__name__, f"rel {err:.2e}")
    assert np.isfinite(np.asarray(out, np.float32)).all() and err < 2e-2
print("sanitize run done")
