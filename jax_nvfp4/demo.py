"""What ``python -m jax_nvfp4 demo`` runs and prints (the command line is in ``__main__``).

* ``run_model``: the embedded model of ``demo_model`` with seeded random weights, bf16 vs NVFP4.
* ``run_checkpoint``: one MLP block (dense gate/up/down, or the MoE experts with their router) of
  a ModelOpt / compressed-tensors checkpoint, NVFP4 vs its dequantized bf16 weights, on random
  hidden states.

Both print to stdout: the device, the backend ``select_backend`` chose and why, the weight bytes
(exact), the rel-L2 output error, and on a GPU the median time per jitted forward. Progress of
the long steps goes to stderr. They return the process exit code: 0, or 2 with a one-line
``error:`` on stderr for a checkpoint that cannot be used.
"""

from __future__ import annotations

import functools
import os
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jax_nvfp4 import demo_model
from jax_nvfp4.backend import select_backend
from jax_nvfp4.checkpoint import CheckpointError, load_checkpoint
from jax_nvfp4.format import NVFP4Weight, dequantize
from jax_nvfp4.prepare import prepare


def _progress(message: str) -> None:
  print(f"[demo] {message}", file=sys.stderr, flush=True)


def _rel_l2(a, b) -> float:
  """``||a - b|| / ||b||`` in float64."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _bytes(label: str, bf16: int, nvfp4: int) -> str:
  return (f"{label}: bf16 {bf16} B ({bf16 / 2**20:.2f} MiB) -> NVFP4 {nvfp4} B "
          f"({nvfp4 / 2**20:.2f} MiB), {bf16 / nvfp4:.2f}x smaller")


def _device_line() -> str:
  dev = jax.devices()[0]
  return f"jax {jax.__version__} on {dev.platform}: {dev.device_kind}"


def _median_seconds(fn, *args, iters: int) -> float:
  """Median wall time of ``iters`` synchronous calls of a jitted ``fn`` (after a warm-up)."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def _timing(pairs, iters: int) -> None:
  """``pairs``: (name, jitted fn, args). Times them on a GPU; says why not elsewhere."""
  platform = jax.devices()[0].platform
  if platform != "gpu":
    print(f"time per forward: skipped on {platform} (only GPU timings mean something here; "
          "the reference backend dequantizes every weight on each call)")
    return
  results = {name: _median_seconds(fn, *args, iters=iters) for name, fn, args in pairs}
  base = results["bf16"]
  for name, sec in results.items():
    print(f"time per forward ({name}): {sec * 1e6:.1f} us (median of {iters} jitted calls)"
          + ("" if name == "bf16" else f", {base / sec:.2f}x the bf16 speed"))


# ----------------------------------------------------------------------------- embedded model

def run_model(config: demo_model.DemoConfig, *, tokens: int, seed: int, iters: int) -> int:
  """Builds, quantizes and runs the embedded model; prints the report (module docstring)."""
  config.validate()
  print(_device_line())
  has_moe = any(config.is_moe(b) for b in range(config.blocks))
  dense_choice = select_backend(weight_format="nvfp4")
  moe_choice = (select_backend(weight_format="nvfp4", moe_activation="swiglu",
                               limit=config.limit) if has_moe else None)
  print(f"backend (attention + dense MLP Linears): {dense_choice.name}: {dense_choice.reason}")
  if moe_choice is not None:
    print(f"backend (MoE experts): {moe_choice.name}: {moe_choice.reason}")
  kinds = ["dense SwiGLU MLP"] + ([f"MoE {config.experts} experts top-{config.top_k} "
                                   f"SwiGLU clamp {config.limit:g}"] if has_moe else [])
  mlps = " / ".join(kinds) + (" alternating" if has_moe else "")
  print(f"model: {config.blocks} decoder block{'s' if config.blocks > 1 else ''} (attention "
        f"{config.heads} heads; {mlps}), hidden {config.hidden}, intermediate "
        f"{config.intermediate}, vocab {config.vocab}; {tokens} tokens")

  params = demo_model.init_params(config, seed)
  ids = jax.random.randint(jax.random.key(seed + 1), (tokens,), 0, config.vocab)
  shapes = config.linear_shapes()
  count = sum(int(np.prod(s)) for _, s in shapes)
  _progress(f"quantizing {len(shapes)} Linear weights ({count / 1e6:.1f} M parameters) with "
            "jax_nvfp4.quantize")
  t0 = time.perf_counter()
  qparams = demo_model.quantize_params(params, progress=lambda m: _progress("  " + m))
  jax.block_until_ready(qparams)
  _progress(f"quantized in {time.perf_counter() - t0:.1f} s")

  lin_b, other_b = demo_model.weight_bytes(params)
  lin_q, other_q = demo_model.weight_bytes(qparams)
  print(_bytes(f"weights of the {len(shapes)} Linears", lin_b, lin_q))
  print(_bytes("whole model (embedding, lm_head, routers, norms not quantized)",
               lin_b + other_b, lin_q + other_q))

  print(f"rel-L2 error of the weights themselves (dequantize(quantize(w)) vs w, all Linears): "
        f"{demo_model.weight_error(params, qparams):.3e}")

  run_params = qparams
  if dense_choice.name == "cuda" or (moe_choice is not None and moe_choice.name == "cuda"):
    _progress("repacking the NVFP4 weights for the CUDA kernels (prepare)")
    experts = moe_choice is not None and moe_choice.name == "cuda"
    dense = dense_choice.name == "cuda"
    run_params = demo_model.map_linears(
        qparams, jax.jit(lambda w: prepare(w) if (experts if w.packed.ndim == 3 else dense)
                         else w))
    lin_p, _ = demo_model.weight_bytes(run_params)
    print(f"  as prepared for the kernels (N padded to 16, K to 64): {lin_p} B")

  fwd = jax.jit(functools.partial(demo_model.forward, config=config))
  # The two models compared for rounding also say which experts each token took.
  fwd_routes = jax.jit(functools.partial(demo_model.forward, config=config, with_routes=True))
  _progress("compiling and running the NVFP4 model (jax.jit)")
  h_q, l_q, r_q = jax.block_until_ready(fwd_routes(run_params, ids))
  _progress("compiling and running the bf16 model (jax.jit)")
  h_b, l_b = jax.block_until_ready(fwd(params, ids))
  h_d, l_d, r_d = fwd_routes(demo_model.dequantize_params(qparams), ids)
  print(f"rel-L2 error, NVFP4 model vs the bf16 model: hidden states {_rel_l2(h_q, h_b):.3e}, "
        f"logits {_rel_l2(l_q, l_b):.3e}")
  print(f"rel-L2 error, NVFP4 model vs the bf16 model running the dequantized weights (no "
        f"quantization, rounding only): hidden states {_rel_l2(h_q, h_d):.3e}, logits "
        f"{_rel_l2(l_q, l_d):.3e}{_route_note(np.asarray(r_q), np.asarray(r_d))}")
  _timing([("nvfp4", fwd, (run_params, ids)), ("bf16", fwd, (params, ids))], iters)
  return 0


def _route_note(r_q: np.ndarray, r_d: np.ndarray) -> str:
  """How many tokens' top-k experts (``[blocks, T, k]``) differ between the NVFP4 model and the
  dequantized bf16 one: rounding can flip a choice, and one flipped choice moves the "rounding
  only" error far beyond rounding (10x here). Empty without MoE blocks."""
  if r_q.shape[0] == 0:
    return ""
  return (f" ({int((r_q != r_d).any(-1).sum())} of {r_q.shape[0] * r_q.shape[1]} tokens' "
          "top-k experts differ between the two runs; a token routed differently moves this far "
          "beyond rounding)")


# ----------------------------------------------------------------------------- checkpoint block

def _layer_key(name: str):
  """Natural order: ``layers.2`` before ``layers.10``."""
  return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name)]


def _find_block(ckpt):
  """The first NVFP4 MLP block of the checkpoint, in layer order: ``("moe", MoEExperts)`` or
  ``("dense", prefix)`` (``<prefix>.gate_proj/.up_proj/.down_proj``); None if there is none."""
  found = []
  for prefix, experts in ckpt.moe.items():
    if experts.fused and all(r.format == "nvfp4" for r in experts.records()):
      found.append((prefix, "moe", experts))
  for name, rec in ckpt.modules.items():
    if name.endswith(".gate_proj") and rec.format == "nvfp4":
      prefix = name[:-len(".gate_proj")]
      others = [ckpt.modules.get(prefix + p) for p in (".up_proj", ".down_proj")]
      if all(r is not None and r.format == "nvfp4" for r in others):
        found.append((prefix, "dense", prefix))
  if not found:
    return None
  _, kind, what = min(found, key=lambda f: _layer_key(f[0]))
  return kind, what


def _router(ckpt, prefix: str, num_experts: int, hidden: int, seed: int):
  """The MoE router weight ``[E, H]`` next to ``<parent>.experts`` (``gate`` in Qwen/Mixtral),
  or a seeded random one (and a note) when the checkpoint has none under a known name."""
  parent = prefix.rsplit(".", 1)[0]
  for name in (parent + ".gate.weight", parent + ".router.weight"):
    w = ckpt.params.get(name)
    if w is not None and tuple(w.shape) == (num_experts, hidden):
      return jnp.asarray(w, jnp.float32), name
  w = jax.random.normal(jax.random.key(seed + 2), (num_experts, hidden), jnp.float32)
  return w / np.sqrt(hidden), "random (no router found next to the experts)"


def run_checkpoint(path: str, *, tokens: int, seed: int, iters: int) -> int:
  """Loads the checkpoint, runs its first NVFP4 MLP block; prints the report."""
  if not os.path.isdir(path):
    print(f"error: checkpoint directory {path!r} does not exist (or is not a directory)",
          file=sys.stderr)
    return 2
  print(_device_line())
  _progress(f"loading {path}")
  try:
    host = jax.devices("cpu")[0]
  except RuntimeError:  # JAX_PLATFORMS without cpu
    host = None
  try:
    # Host memory first: only the block the demo runs goes to the accelerator.
    ckpt = load_checkpoint(path, device=host)
  except CheckpointError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  block = _find_block(ckpt)
  if block is None:
    unfused = [f"{p}: {m.note}" for p, m in ckpt.moe.items() if not m.fused]
    print(f"error: {path}: no MLP block with NVFP4 weights (gate/up/down, or MoE experts with "
          f"one stacked w13) found; modules: {', '.join(sorted(ckpt.modules)) or 'none'}"
          + "".join(f"; {u}" for u in unfused), file=sys.stderr)
    return 2
  kind, what = block
  cfg = ckpt.config.get("text_config") or ckpt.config
  act = {r.activation_format for r in (what.records() if kind == "moe" else
                                       [ckpt.modules[what + p] for p in
                                        (".gate_proj", ".up_proj", ".down_proj")])}
  act_format = "nvfp4" if "nvfp4" in act else None
  print(f"checkpoint: {path}: {ckpt.producer} {ckpt.quant_algo}"
        f" ({cfg.get('model_type', 'unknown model type')})")

  put = lambda w: jax.device_put(w, jax.devices()[0])
  if kind == "moe":
    w13, w2 = put(what.w13.weight), put(what.w2.weight)
    e, _, hidden = w13.shape
    inter = w2.shape[-1]
    top_k = int(cfg.get("num_experts_per_tok") or cfg.get("moe_topk") or min(2, e))
    renorm = bool(cfg.get("norm_topk_prob", True))
    router, router_name = _router(ckpt, what.prefix, e, hidden, seed)
    router = put(router)
    choice = select_backend(weight_format="nvfp4", activation_format=act_format,
                            moe_activation="swiglu")
    print(f"block: {what.prefix}: MoE, {e} experts top-{top_k} (softmax, "
          f"{'renormalized' if renorm else 'not renormalized'}), SwiGLU, w13 "
          f"{list(w13.shape)}, w2 {list(w2.shape)}; router {router_name}")
    weights = {"w13": w13, "w2": w2}
    shapes = [w13.shape, w2.shape]

    def block_fn(h, ws):
      return demo_model.moe(h, router, ws["w13"], ws["w2"], top_k=top_k, renormalize=renorm)
  else:
    weights = {p: put(ckpt.modules[f"{what}.{p}_proj"].weight) for p in ("gate", "up", "down")}
    inter, hidden = weights["gate"].shape
    choice = select_backend(weight_format="nvfp4", activation_format=act_format)
    print(f"block: {what}: dense SwiGLU MLP, gate/up [{inter}, {hidden}], down "
          f"[{hidden}, {inter}]")
    shapes = [w.shape for w in weights.values()]

    def block_fn(h, ws):
      return demo_model.dense_mlp(h, ws["gate"], ws["up"], ws["down"])
  print(f"backend: {choice.name}: {choice.reason}")
  print(f"hidden states: {tokens} random tokens x {hidden}, bf16")

  bf16_bytes = sum(2 * int(np.prod(s)) for s in shapes)
  nvfp4_bytes = sum(w.nbytes for w in weights.values())
  print(_bytes("weights of the block", bf16_bytes, nvfp4_bytes))
  deq = {n: dequantize(w, jnp.bfloat16) for n, w in weights.items()}
  run_w = weights
  if choice.name == "cuda":
    _progress("repacking the NVFP4 weights for the CUDA kernels (prepare)")
    run_w = {n: prepare(w) if isinstance(w, NVFP4Weight) else w for n, w in weights.items()}

  x = jax.random.normal(jax.random.key(seed), (tokens, hidden), jnp.bfloat16)
  fn = jax.jit(block_fn)
  _progress("compiling and running the block (jax.jit)")
  y_q = fn(x, run_w)
  y_b = fn(x, deq)
  print(f"rel-L2 error, NVFP4 block vs the same block with the dequantized weights in bf16: "
        f"{_rel_l2(y_q, y_b):.3e} (the weights are the same values: arithmetic and rounding only)")
  _timing([("nvfp4", fn, (x, run_w)), ("bf16", fn, (x, deq))], iters)
  return 0
