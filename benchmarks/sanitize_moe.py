"""Runs the grouped MoE kernel on a few awkward shapes; meant to be run under compute-sanitizer.

  python benchmarks/sanitize_moe.py [--decode-only]

``--decode-only`` runs only the k-sliced decode layers (the short x tiles) and the repeated-id
passes: a few minutes under memcheck instead of about eight."""
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jax_nvfp4 as nf
from jax_nvfp4.ops import moe as moe_ops

rng = np.random.default_rng(0)
decode_only = "--decode-only" in sys.argv[1:]
choose = moe_ops.choose_moe_k_slices
choose_tiles = moe_ops.choose_moe_prefill_tiles

# (tokens, hidden, intermediate, experts, top_k, forced launch): sizes off the tile, T = 1,
# empty experts; (130, ...) runs block_m 64 (wgmma on sm_90a); (1, 2048, 2048, 8, 2) takes the
# k-sliced decode launch by default; "k_slices" forces it on sizes off its unit (N = 96 and 208,
# K = 4 and 1 chunks); "tiles" forces 3 N blocks per block at block_m 64 (7 and 4 N blocks).
# The k-sliced decode blocks hold T x rows: 1 (T = 1), 2 (T = 2) and 4 (T = 3).
for m, h, i, e, k, forced in [(1, 256, 176, 5, 2, None), (37, 128, 48, 12, 3, None),
                              (130, 192, 96, 4, 2, None), (1, 2048, 2048, 8, 2, None),
                              (2, 208, 48, 6, 2, "k_slices"), (3, 208, 48, 6, 2, "k_slices"),
                              (300, 512, 400, 6, 2, "tiles")]:
  if decode_only and not (m <= 4 and (forced == "k_slices" or h == 2048)):
    continue
  moe_ops.choose_moe_k_slices = ((lambda *a, **kw: moe_ops.MOE_K_SLICES)
                                 if forced == "k_slices" else choose)
  moe_ops.choose_moe_prefill_tiles = (lambda *a, **kw: 3) if forced == "tiles" else choose_tiles
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
moe_ops.choose_moe_prefill_tiles = choose_tiles
# Repeated expert ids in a token's top-k: more rows per expert than tokens, so the short decode
# blocks (k-slices forced) run several passes over their tile.
moe_ops.choose_moe_k_slices = lambda *a, **kw: moe_ops.MOE_K_SLICES
for ids in ([[3, 3]], [[1, 1], [1, 5]], [[2, 2], [2, 2], [2, 6]]):
  ti = jnp.asarray(ids, jnp.int32)
  tw = jnp.full(ti.shape, 0.5, jnp.float32)
  w13 = nf.prepare(nf.quantize(jnp.asarray(rng.standard_normal((8, 96, 208)) * 0.1, jnp.float32)))
  w2 = nf.prepare(nf.quantize(jnp.asarray(rng.standard_normal((8, 208, 48)) * 0.1, jnp.float32)))
  x = jnp.asarray(rng.standard_normal((len(ids), 208)), jnp.bfloat16)
  out = jax.jit(lambda x: nf.fused_moe(x, w13, w2, topk_weights=tw, topk_ids=ti))(x)
  ref = jax.jit(lambda x: nf.fused_moe(x, w13, w2, topk_weights=tw, topk_ids=ti,
                                       backend="reference"))(x)
  err = float(jnp.linalg.norm((out - ref).astype(jnp.float32)) /
              jnp.linalg.norm(ref.astype(jnp.float32)))
  print("repeated ids", ids, f"rel {err:.2e}")
  assert np.isfinite(np.asarray(out, np.float32)).all() and err < 2e-2
moe_ops.choose_moe_k_slices = choose
if decode_only:
  print("sanitize run done (decode only)")
  sys.exit(0)
# The one-launch alignment: runs longer than a 1024-pair chunk, 1024 experts with 1024 threads
# (72 KB of shared memory, past the 48 KB default), an expert map, ids out of range.
for m, e, k, bm, mapped in [(3000, 2, 1, 64, False), (200, 1024, 6, 32, True),
                            (333, 5, 3, 32, True), (4096, 256, 8, 64, False)]:
  ids = jnp.asarray(rng.integers(-2, e + 2, (m, k)).astype(np.int32))
  emap = jnp.asarray(np.where(np.arange(e) % 2 == 0, np.arange(e) // 2, -1).astype(np.int32)) \
      if mapped else None
  got = jax.jit(lambda i, mp: nf.align_tokens(i, e, bm, mp, backend="cuda"))(ids, emap)
  want = jax.jit(lambda i, mp: nf.align_tokens(i, e, bm, mp, backend="reference"))(ids, emap)
  for g, w in zip((got.sorted_ids, got.block_expert, got.num_padded),
                  (want.sorted_ids, want.block_expert, want.num_padded)):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
  print("align", m, e, k, bm, mapped, "ok")
# An expert map: the GEMMs leave the rows of non-local pairs unwritten, the combine masks them.
m, h, i, e, k = 19, 128, 64, 6, 2
w13 = nf.prepare(nf.quantize(jnp.asarray(rng.standard_normal((3, 2 * i, h)) * 0.1, jnp.float32)))
w2 = nf.prepare(nf.quantize(jnp.asarray(rng.standard_normal((3, h, i)) * 0.1, jnp.float32)))
x = jnp.asarray(rng.standard_normal((m, h)), jnp.bfloat16)
logits = jnp.asarray(rng.standard_normal((m, e)), jnp.float32)
emap = jnp.array([0, -1, 1, -1, 2, -1], jnp.int32)
out = jax.jit(lambda x, l: nf.fused_moe(x, w13, w2, router_logits=l, top_k=k,
                                        expert_map=emap))(x, logits)
assert np.isfinite(np.asarray(out, np.float32)).all()
print("sanitize run done")
