"""Plots of benchmark results: time per call vs tokens M, one panel per shape, against the bf16
baselines and the HBM roofline. matplotlib is imported here only, when a plot is made.

Inputs are the result dicts of ``jax_nvfp4.bench.dense.run`` / ``moe.run`` (or the JSON files
the benchmarks write), or bare lists of their rows.
"""

from __future__ import annotations

import math
import os

#: One line per measured column: (row key, label, color, marker, linestyle).
_DENSE_LINES = (
    ("kernel_us", "NVFP4 nvfp4_matmul (jax_nvfp4)", "tab:red", "o", "-"),
    ("xla_bf16_us", "bf16 dot (XLA)", "tab:blue", "s", "-"),
    ("cublas_bf16_us", "bf16 matmul (cuBLAS via torch)", "tab:cyan", "^", "-"),
    ("jax_dequant_dot_us", "pure-JAX dequantize + bf16 dot", "tab:gray", "v", "-"),
    ("roofline_us", "NVFP4 HBM roofline", "black", None, "--"),
    ("bf16_roofline_us", "bf16 HBM roofline", "tab:blue", None, ":"),
)
_MOE_LINES = (
    ("nvfp4_us", "NVFP4 fused_moe (jax_nvfp4)", "tab:red", "o", "-"),
    ("ragged_bf16_us", "bf16 layer (jax.lax.ragged_dot)", "tab:blue", "s", "-"),
    ("roofline_us", "NVFP4 HBM roofline (experts hit)", "black", None, "--"),
)


def _rows_and_meta(result) -> tuple[list[dict], dict]:
  if result is None:
    return [], {}
  if isinstance(result, dict):
    return list(result.get("rows", [])), result
  return list(result), {}


def _groups(rows: list[dict], key) -> dict[tuple, list[dict]]:
  out: dict[tuple, list[dict]] = {}
  for r in rows:
    out.setdefault(key(r), []).append(r)
  return out


def _panel(ax, rows: list[dict], x_key: str, lines, title: str) -> None:
  rows = sorted(rows, key=lambda r: r[x_key])
  xs_all = [r[x_key] for r in rows]
  for key, label, color, marker, style in lines:
    pts = [(r[x_key], r[key]) for r in rows if r.get(key) is not None and r[key] > 0]
    if not pts:
      continue
    xs, ys = zip(*pts)
    ax.plot(xs, ys, color=color, marker=marker, linestyle=style, linewidth=1.6,
            markersize=4, label=label)
  from matplotlib import ticker
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  plain = ticker.FuncFormatter(lambda v, _: f"{v:g}")
  ax.yaxis.set_major_formatter(plain)
  ax.yaxis.set_minor_locator(ticker.LogLocator(subs=(2.0, 5.0)))
  ax.yaxis.set_minor_formatter(plain)
  ax.tick_params(axis="y", which="both", labelsize=8)
  ax.set_xticks(xs_all)
  ax.set_xticklabels([str(x) for x in xs_all], fontsize=8)
  ax.set_title(title, fontsize=10)
  ax.grid(True, which="both", alpha=0.3)


def _bf16_roofline(rows: list[dict], bw_gbs: float | None) -> list[dict]:
  """Adds ``bf16_roofline_us`` (bf16 weight + x + out bytes / copy bandwidth) to dense rows."""
  if not bw_gbs:
    return rows
  out = []
  for r in rows:
    m, n, k = r["m"], r["n"], r["k"]
    out.append(dict(r, bf16_roofline_us=(2 * n * k + 2 * m * k + 2 * m * n) / (bw_gbs * 1e3)))
  return out


def make_figure(dense=None, moe=None, *, title: str | None = None, pyplot: bool = False):
  """A matplotlib ``Figure`` with one panel per dense ``K x N`` shape and per MoE shape.

  Each panel: microseconds per call (log) vs M tokens (log2), for every measured column, with
  the NVFP4 HBM roofline dashed (dense panels also show the bf16 roofline, dotted, when the
  result records its copy bandwidth). ``pyplot=True`` creates the figure through
  ``matplotlib.pyplot`` (so that Jupyter shows it); otherwise it belongs to no backend and is
  only saved.
  """
  dense_rows, dense_meta = _rows_and_meta(dense)
  moe_rows, moe_meta = _rows_and_meta(moe)
  dense_rows = _bf16_roofline(dense_rows, dense_meta.get("copy_bandwidth_gbs"))
  panels = []
  for (k, n), rows in _groups(dense_rows, lambda r: (r["k"], r["n"])).items():
    panels.append(("dense", f"dense: x[M, {k}] @ W[{n}, {k}].T", rows))
  for (e, h, i, tk), rows in _groups(moe_rows, lambda r: (r["e"], r["h"], r["i"],
                                                           r["top_k"])).items():
    panels.append(("moe", f"MoE layer: E={e} H={h} I={i} top-{tk}", rows))
  if not panels:
    raise ValueError("make_figure: no rows to plot (give dense and/or moe results)")
  ncols = min(3, len(panels))
  nrows = math.ceil(len(panels) / ncols)
  size = (4.6 * ncols, 3.7 * nrows + 0.9)
  if pyplot:
    import matplotlib.pyplot as plt
    fig = plt.figure(figsize=size)
  else:
    from matplotlib.figure import Figure
    fig = Figure(figsize=size)
  axes = fig.subplots(nrows, ncols, squeeze=False)
  for ax, (kind, name, rows) in zip(axes.flat, panels):
    if kind == "dense":
      _panel(ax, rows, "m", _DENSE_LINES, name)
      ax.set_xlabel("M (tokens)")
    else:
      _panel(ax, rows, "tokens", _MOE_LINES, name)
      ax.set_xlabel("T (tokens)")
    ax.set_ylabel("time per call (µs), lower is faster", fontsize=8)
  for ax in list(axes.flat)[len(panels):]:
    ax.set_visible(False)
  handles, labels = {}, []
  for ax in axes.flat:
    for h, lab in zip(*ax.get_legend_handles_labels()):
      if lab not in handles:
        handles[lab] = h
        labels.append(lab)
  fig.legend([handles[l] for l in labels], labels, loc="lower center",
             ncol=min(4, len(labels)), fontsize=8, frameon=False)
  meta = dense_meta or moe_meta
  if title is None:
    device = meta.get("device", "")
    title = "jax_nvfp4 benchmark"
    if device:
      title += f" on {device}"
    if meta.get("date"):
      title += f", {meta['date']}"
    if meta.get("copy_bandwidth_gbs"):
      title += f" (copy bandwidth {meta['copy_bandwidth_gbs']:.0f} GB/s)"
    if device.lower() == "cpu":
      title += "\nCPU numbers: the pure-JAX reference path, not the CUDA kernels"
  fig.suptitle(title, fontsize=11)
  legend_rows = math.ceil(len(labels) / 4)
  fig.tight_layout(rect=(0, (0.25 + 0.2 * legend_rows) / size[1], 1, 1))
  return fig


def plot_results(path, dense=None, moe=None, *, title: str | None = None, dpi: int = 110) -> str:
  """Writes ``make_figure(dense, moe)`` as a PNG file at ``path``; returns the path."""
  fig = make_figure(dense, moe, title=title)
  path = os.fspath(path)
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  fig.savefig(path, format="png", dpi=dpi)
  return path
