"""The benchmark module (jax_nvfp4.bench): the plot of fake results, the smoke run of
``python -m jax_nvfp4 bench --allow-cpu`` at tiny sizes, and the wrappers
benchmarks/bench_dense.py / bench_moe.py keeping their options and JSON formats."""

import json
import os
import subprocess
import sys

import pytest

from jax_nvfp4.bench import common, dense, moe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
PNG = b"\x89PNG\r\n\x1a\n"
DENSE_KEYS = ["device", "date", "jax", "copy_bandwidth_gbs", "method", "rows"]
DENSE_ROW_KEYS = ["k", "n", "m", "kernel_us", "xla_bf16_us", "cublas_bf16_us",
                  "jax_dequant_dot_us", "roofline_us", "pct_roofline", "kernel_tflops",
                  "vs_cublas", "kernel_device_us", "pct_roofline_device"]
MOE_KEYS = ["device", "date", "jax", "copy_bandwidth_gbs", "kernel", "runs", "trials", "method",
            "rows"]
MOE_ROW_KEYS = ["e", "h", "i", "top_k", "tokens", "nvfp4_us", "roofline_us", "pct_roofline",
                "nvfp4_tflops", "experts_hit", "fp4_copies", "ragged_bf16_us", "bf16_copies"]


def _fake_dense():
  rows = []
  for k, n in ((4096, 14336), (4096, 4096)):
    for m in (1, 16, 256, 4096):
      kernel = 10.0 + m * 0.5
      rows.append(dict(k=k, n=n, m=m, kernel_us=kernel, xla_bf16_us=2 * kernel,
                       cublas_bf16_us=None if m == 256 else 1.8 * kernel,
                       jax_dequant_dot_us=5 * kernel, roofline_us=4.0 + m * 0.01,
                       pct_roofline=100 * (4.0 + m * 0.01) / kernel, kernel_tflops=1.0,
                       vs_cublas=None))
  return dict(device="Fake GPU", date="2026-01-01", jax="0", copy_bandwidth_gbs=3000.0,
              method="fake", rows=rows)


def _fake_moe():
  rows = [dict(e=8, h=1024, i=512, top_k=2, tokens=t, nvfp4_us=50.0 * t ** 0.5,
               roofline_us=5.0 * min(t, 4), pct_roofline=10.0, nvfp4_tflops=1.0,
               experts_hit=float(min(8, 2 * t)), fp4_copies=8,
               ragged_bf16_us=None if t == 1024 else 300.0, bf16_copies=4)
          for t in (1, 16, 1024)]
  rows[-1]["ragged_skipped"] = "estimated 2.00 s per call"
  return rows  # a bare list of rows works too


def test_plot_of_fake_results_writes_a_png(tmp_path):
  pytest.importorskip("matplotlib")
  from jax_nvfp4.bench.plot import make_figure, plot_results
  path = plot_results(tmp_path / "sub" / "plot.png", _fake_dense(), _fake_moe())
  data = open(path, "rb").read()
  assert path == str(tmp_path / "sub" / "plot.png")
  assert data.startswith(PNG) and len(data) > 20000
  fig = make_figure(_fake_dense(), _fake_moe())
  visible = [ax for ax in fig.axes if ax.get_visible()]
  assert [ax.get_title() for ax in visible] == [
      "dense: x[M, 4096] @ W[14336, 4096].T", "dense: x[M, 4096] @ W[4096, 4096].T",
      "MoE layer: E=8 H=1024 I=512 top-2"]
  labels = [line.get_label() for line in visible[0].get_lines()]
  assert labels == ["NVFP4 nvfp4_matmul (jax_nvfp4)", "bf16 dot (XLA)",
                    "bf16 matmul (cuBLAS via torch)", "pure-JAX dequantize + bf16 dot",
                    "NVFP4 HBM roofline", "bf16 HBM roofline"]
  ragged = [l for l in visible[2].get_lines() if "ragged" in l.get_label()][0]
  assert list(ragged.get_xdata()) == [1, 16]  # the skipped point is left out
  assert "Fake GPU" in fig._suptitle.get_text()  # pylint: disable=protected-access
  with pytest.raises(ValueError, match="no rows to plot"):
    make_figure()


def test_plot_of_the_recorded_h100_results(tmp_path):
  pytest.importorskip("matplotlib")
  from jax_nvfp4.bench.plot import plot_results
  with open(os.path.join(RESULTS, "dense_h100_2026-11-24_v3.json")) as f:
    d = json.load(f)
  with open(os.path.join(RESULTS, "moe_h100_2026-11-24_quick.json")) as f:
    m = json.load(f)
  # Results before v8 have no device-time columns.
  assert list(d) == DENSE_KEYS and list(d["rows"][0]) == DENSE_ROW_KEYS[:-2]
  assert list(m) == MOE_KEYS and list(m["rows"][0])[:len(MOE_ROW_KEYS)] == MOE_ROW_KEYS
  assert open(plot_results(tmp_path / "h100.png", d, m), "rb").read().startswith(PNG)


def test_method_texts_are_the_recorded_ones():
  # The newest committed results must carry the current method (a method change needs new runs).
  for name in ("dense_h200_2026-12-02_v12.json", "dense_h200_2026-12-02_v12_large_m.json"):
    with open(os.path.join(RESULTS, name)) as f:
      assert json.load(f)["method"] == dense.METHOD
  with open(os.path.join(RESULTS, "moe_h100_2026-11-25_v10_quick.json")) as f:
    assert json.load(f)["method"] == moe.METHOD


def test_parsers():
  assert common.parse_shapes("4096x14336, 8X16", 2, "s") == [(4096, 14336), (8, 16)]
  assert common.parse_ints("1,16", "m") == [1, 16]
  for bad in ("4096", "0x16", "ax16", ""):
    with pytest.raises(ValueError, match="positive integers"):
      common.parse_shapes(bad, 2, "s")


def test_roofline_bytes_and_expert_bytes():
  # NVFP4 codes (K/2 B per row) + one E4M3 scale per 16 + bf16 x and out.
  assert dense.roofline_bytes(1, 4096, 4096) == 4096 * 2048 + 4096 * 256 + 2 * 4096 * 2
  # Kernel layout: a 16 x 64 tile is 32 lanes x 4 uint32 words of codes + 64 UE5M3 scales.
  assert moe.fp4_expert_bytes(16, 64) == 512 + 64 + 4
  assert moe.fp4_expert_bytes(17, 65) == 4 * (512 + 64) + 4


def _python(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu", MPLBACKEND="Agg")
  # A script's own directory comes first on sys.path: make this checkout's jax_nvfp4 importable.
  env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
  return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600, check=False)


def test_bench_subcommand_smoke_run_on_cpu(tmp_path):
  pytest.importorskip("matplotlib")
  out, png = tmp_path / "r.json", tmp_path / "r.png"
  proc = _python("-m", "jax_nvfp4", "bench", "--allow-cpu", "--dense-shapes", "64x32", "--ms",
                 "1,4", "--moe-shapes", "4x32x16x2", "--tokens", "2", "--json", str(out),
                 "--plot", str(png))
  assert proc.returncode == 0, proc.stderr
  text = proc.stdout
  assert "grouped-GEMM kernel: NO (reference path)" in text
  assert "NOT the CUDA kernels" in text
  assert "dense roofline table" in text and "MoE roofline table" in text
  result = json.loads(out.read_text())
  assert list(result) == ["dense", "moe"]
  assert list(result["dense"]) == DENSE_KEYS and list(result["moe"]) == MOE_KEYS
  assert [list(r) for r in result["dense"]["rows"]] == [DENSE_ROW_KEYS] * 2
  assert list(result["moe"]["rows"][0])[:len(MOE_ROW_KEYS)] == MOE_ROW_KEYS
  assert result["moe"]["rows"][0]["ragged_bf16_us"] > 0
  assert png.read_bytes().startswith(PNG)


def test_allow_cpu_defaults_to_small_sizes_and_json_dirs_are_made(tmp_path):
  """Without a GPU, --allow-cpu with no sizes given smoke-tests at bench.cli's CPU_* sizes (the
  full defaults would run for hours on the reference path), and --json's directory is created
  before measuring."""
  from jax_nvfp4.bench import cli
  out = tmp_path / "new" / "dir" / "r.json"
  proc = _python("-m", "jax_nvfp4", "bench", "--allow-cpu", "--only", "dense", "--no-plot",
                 "--no-torch", "--json", str(out))
  assert proc.returncode == 0, proc.stderr
  rows = json.loads(out.read_text())["dense"]["rows"]
  assert [(r["k"], r["n"], r["m"]) for r in rows] == [
      (k, n, m) for k, n in cli.CPU_DENSE_SHAPES for m in cli.CPU_MS]


def test_wrappers_keep_their_options_and_formats(tmp_path):
  out = tmp_path / "d.json"
  proc = _python("benchmarks/bench_dense.py", "--shapes", "64x32", "--ms", "2", "--no-torch",
                 "--out", str(out))
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert lines[0].startswith("device: cpu; jax ") and lines[0].endswith(" GB/s")
  assert lines[1].startswith("    64x32     M=2     kernel ") and " | cublas      nan | " in lines[1]
  result = json.loads(out.read_text())
  assert list(result) == DENSE_KEYS and result["method"] == dense.METHOD
  assert list(result["rows"][0]) == DENSE_ROW_KEYS

  proc = _python("benchmarks/bench_moe.py")
  assert proc.returncode == 1
  assert proc.stderr.strip() == ("bench_moe.py needs a GPU (pass --allow-cpu to smoke-test the "
                                 "script on CPU)")
  out = tmp_path / "m.json"
  proc = _python("benchmarks/bench_moe.py", "--allow-cpu", "--quick", "--shapes", "4x32x16x2",
                 "--tokens", "1", "--no-ragged", "--out", str(out))
  assert proc.returncode == 0, proc.stderr
  assert "   E     H      I  k     T   nvfp4 us   roof us  %roof  ragged us" in proc.stdout
  result = json.loads(out.read_text())
  assert list(result) == MOE_KEYS and (result["runs"], result["trials"]) == (2, 3)
  assert result["method"] == moe.METHOD and result["rows"][0]["ragged_bf16_us"] is None
