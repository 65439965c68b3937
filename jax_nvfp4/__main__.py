"""Command line: ``python -m jax_nvfp4 demo`` (see ``jax_nvfp4.demo``), ``inspect DIR``,
``bench`` (see ``jax_nvfp4.bench.cli``) and ``env`` (see ``jax_nvfp4.env_report``)."""

from __future__ import annotations

import argparse
import dataclasses
import sys

_MODEL_OPTIONS = ("blocks", "hidden", "intermediate", "heads", "experts", "top_k", "limit",
                  "vocab")


def _demo(parser, args) -> int:
  from jax_nvfp4 import demo, demo_model
  if args.tokens < 1:
    parser.error(f"--tokens must be >= 1, got {args.tokens}")
  if args.iters < 1:
    parser.error(f"--iters must be >= 1, got {args.iters}")
  given = [name for name in _MODEL_OPTIONS if getattr(args, name) is not None]
  if args.checkpoint is not None:
    if given:
      parser.error(f"--{given[0].replace('_', '-')} sets the embedded model; it does not apply "
                   "with --checkpoint")
    return demo.run_checkpoint(args.checkpoint, tokens=args.tokens, seed=args.seed,
                               iters=args.iters)
  config = demo_model.DemoConfig(**{name: getattr(args, name) for name in given})
  try:
    config.validate()
  except ValueError as e:  # "top_k must be ..." -> "--top-k must be ..."
    field, _, rest = str(e).partition(" ")
    parser.error(f"--{field.replace('_', '-')} {rest}")
  return demo.run_model(config, tokens=args.tokens, seed=args.seed, iters=args.iters)


def _inspect(args) -> int:
  from jax_nvfp4.checkpoint import inspect
  return inspect.main(args.path)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m jax_nvfp4", description=__doc__)
  sub = parser.add_subparsers(dest="command", required=True)
  demo = sub.add_parser(
      "demo", help="quantize a small decoder model (or a checkpoint's MLP block) to NVFP4, run "
      "it under jit, report backend, memory, error and speed",
      description="Runs an embedded model (seeded random weights) in bf16 and NVFP4, or with "
      "--checkpoint one MLP block of an NVFP4 checkpoint, and prints the backend, the weight "
      "bytes, the rel-L2 output error and (on a GPU) the time per forward.")
  from jax_nvfp4 import demo_model  # jax is imported by the package anyway
  defaults = {f.name: f.default for f in dataclasses.fields(demo_model.DemoConfig)}
  demo.add_argument("--tokens", type=int, default=32, help="sequence length (default 32)")
  demo.add_argument("--seed", type=int, default=0, help="seed of weights and inputs")
  demo.add_argument("--iters", type=int, default=20, help="timed calls per model on a GPU")
  demo.add_argument("--checkpoint", metavar="DIR", help="run the first NVFP4 MLP block of this "
                    "ModelOpt / compressed-tensors checkpoint instead of the embedded model")
  model = demo.add_argument_group("embedded model (defaults in brackets)")
  for name, kind, text in (("blocks", int, "decoder blocks, dense MLP and MoE alternating"),
                           ("hidden", int, "hidden size, a multiple of 16 and of --heads"),
                           ("intermediate", int, "MLP / expert intermediate size, multiple of 16"),
                           ("heads", int, "attention heads"), ("experts", int, "MoE experts"),
                           ("top_k", int, "experts per token"),
                           ("limit", float, "SwiGLU clamp of the experts"),
                           ("vocab", int, "vocabulary (embedding, lm_head)")):
    model.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=None,
                       help=f"{text} [{defaults[name]}]")
  inspect = sub.add_parser("inspect", help="list a checkpoint's modules: format, shapes, backend")
  inspect.add_argument("path", help="checkpoint directory (ModelOpt or compressed-tensors)")
  from jax_nvfp4.bench import cli as bench_cli
  bench = sub.add_parser(
      "bench", help="GPU: dense and MoE benchmarks vs bf16 and the HBM roofline, tables and a "
      "PNG plot", description=bench_cli.__doc__.split("\n\n")[0].replace("``", ""))
  bench_cli.add_arguments(bench)
  sub.add_parser("env", help="what runs on this machine and why: versions, device, build, "
                 "backend, and on a GPU the kernels' launch facts")
  args = parser.parse_args(argv)
  if args.command == "env":
    from jax_nvfp4 import env_report
    return env_report.main()
  if args.command == "demo":
    return _demo(demo, args)
  if args.command == "inspect":
    return _inspect(args)
  if args.command == "bench":
    return bench_cli.main(bench, args)
  return 2


if __name__ == "__main__":
  sys.exit(main())
