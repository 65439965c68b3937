"""Benchmarks of the NVFP4 ops against bf16 and the HBM roofline (GPU numbers; on a CPU they time
the pure-JAX reference path and only smoke-test the method).

* ``jax_nvfp4.bench.dense``: ``nvfp4_matmul`` vs XLA's bf16 dot, cuBLAS (torch) and the pure-JAX
  dequantize + dot (``run``, ``bench_shape``).
* ``jax_nvfp4.bench.moe``: ``fused_moe`` vs the bf16 layer with ``jax.lax.ragged_dot``.
* ``jax_nvfp4.bench.common``: the shared method (``many``, ``time_per_call``,
  ``copy_bandwidth``).
* ``jax_nvfp4.bench.plot``: ``make_figure`` / ``plot_results`` (matplotlib, imported only there).
* ``jax_nvfp4.bench.cli``: ``python -m jax_nvfp4 bench``.

``benchmarks/bench_dense.py`` and ``benchmarks/bench_moe.py`` are command-line wrappers of the
first two.
"""

from jax_nvfp4.bench import common, dense, moe
from jax_nvfp4.bench.common import copy_bandwidth, many, time_per_call

__all__ = ["common", "copy_bandwidth", "dense", "many", "moe", "time_per_call"]
