"""Runs a test worker on 8 fake CPU devices in a fresh interpreter.

``XLA_FLAGS=--xla_force_host_platform_device_count=8`` only takes effect if it is set before jax
starts its CPU backend, and the pytest process has long started it. So a test calls
``run_worker("tests.test_x", "worker", *args)``: a child Python imports that module, calls
``worker(*args)`` (which imports jax itself), and hands back its JSON-able result.

Also: helpers the workers share (collective counting in compiled HLO).
"""

from __future__ import annotations

import importlib
import json
import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEVICES = 8
_MARKER = "@@MULTIDEVICE-RESULT@@"


def run_worker(module: str, func: str, *args, timeout: float = 300):
  """``module.func(*args)`` in a child process with 8 CPU devices; returns its result."""
  flags = os.environ.get("XLA_FLAGS", "")
  flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", flags)
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={DEVICES}".strip(),
             PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
  proc = subprocess.run([sys.executable, "-m", "tests._multidevice", module, func, json.dumps(args)],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
  lines = [l for l in proc.stdout.splitlines() if l.startswith(_MARKER)]
  if proc.returncode or not lines:
    raise AssertionError(f"{module}.{func} failed on {DEVICES} CPU devices (rc {proc.returncode})"
                         f"\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-8000:]}")
  return json.loads(lines[-1][len(_MARKER):])


# ----------------------------------------------------------------------------- HLO helpers

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


def collective_counts(hlo_text: str) -> dict[str, int]:
  """Collective ops in compiled HLO text (async ``-start`` forms counted once)."""
  return {c: len(re.findall(rf"\s{c}(?:-start)?\(", hlo_text)) for c in COLLECTIVES}


def gathered_shapes(hlo_text: str) -> list[str]:
  """Result shapes (like ``u8[128,256]``, layouts dropped) of the all-gathers in HLO text."""
  found = re.findall(r"=\s*(.+?)\s+all-gather(?:-start)?\(", hlo_text)
  return [s for types in found for s in re.findall(r"\w+\[[\d,]*\]", types)]


def main(argv) -> None:
  module, func, args = argv[1], argv[2], json.loads(argv[3])
  result = getattr(importlib.import_module(module), func)(*args)
  print(_MARKER + json.dumps(result), flush=True)


if __name__ == "__main__":
  main(sys.argv)
