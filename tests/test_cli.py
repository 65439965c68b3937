"""The README's main job (``python -m jax_nvfp4 demo``) runs and its numbers are right; the
``bench`` subcommand refuses to run without a GPU, cleanly.

The demo runs in a subprocess on the CPU; its printed numbers are checked against facts computed
here independently: weight bytes from a hand formula (or the checkpoint files read by the
fixtures' own safetensors reader), the NVFP4 weight error from the float64 NumPy oracle.
"""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from jax_nvfp4.__main__ import main
from tests import checkpoint_fixtures as fx
from tests import numpy_reference as npref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A small embedded model: 2 blocks (dense MLP, then MoE), hidden 64, I = 80 (not a multiple
# of 64), 4 experts top-2, vocab 128, 8 tokens.
SMALL = dict(blocks=2, hidden=64, intermediate=80, heads=4, experts=4, top_k=2, vocab=128)
TOKENS = 8
# bf16 rounds to 8 significant bits (unit roundoff 2^-8 = 3.9e-3); the NVFP4 and the bf16 runs
# of the same weight values round at a handful of points: their outputs differ by a few of those.
ROUNDING_MAX = 2e-2


def _cli(command: str, *args: str, cpu: bool = True) -> subprocess.CompletedProcess:
  env = dict(os.environ)
  if cpu:
    env["JAX_PLATFORMS"] = "cpu"
  return subprocess.run([sys.executable, "-m", "jax_nvfp4", command, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300, check=False)


def _demo(*args: str, cpu: bool = True) -> subprocess.CompletedProcess:
  return _cli("demo", *args, cpu=cpu)


def _options(config: dict) -> list[str]:
  out = []
  for name, value in config.items():
    out += ["--" + name.replace("_", "-"), str(value)]
  return out


def _number(pattern: str, text: str) -> float:
  m = re.search(pattern, text)
  assert m, f"{pattern!r} not in the demo's output:\n{text}"
  return float(m.group(1))


@pytest.fixture(scope="module")
def small_demo():
  proc = _demo(*_options(SMALL), "--tokens", str(TOKENS), "--seed", "3")
  assert proc.returncode == 0, proc.stderr
  return proc


def nvfp4_bytes(n: int, k: int) -> int:
  """One [N, K] NVFP4 Linear: 4-bit codes, one E4M3 byte per 16, one float32 global scale."""
  return n * k // 2 + n * k // 16 + 4


def small_model_bytes(c: dict) -> tuple[int, int, int]:
  """(bf16 bytes of the Linears, their NVFP4 bytes, bytes of everything else) by hand."""
  h, i, e, v = c["hidden"], c["intermediate"], c["experts"], c["vocab"]
  bf16 = q = 0
  other = 2 * v * h * 2 + h * 4                    # embedding + lm_head (bf16), final norm (f32)
  for b in range(c["blocks"]):
    linears = [(h, h)] * 4                          # q, k, v, o
    other += 2 * h * 4                              # two float32 RMSNorm weights
    if b % 2:                                       # MoE: per expert w13 [2I, H] and w2 [H, I]
      linears += [(2 * i, h)] * e + [(h, i)] * e    # one global scale per expert and matrix
      other += e * h * 4                            # float32 router
    else:
      linears += [(i, h), (i, h), (h, i)]           # gate, up, down
    bf16 += sum(2 * n * k for n, k in linears)
    q += sum(nvfp4_bytes(n, k) for n, k in linears)
  return bf16, q, other


def test_demo_says_reference_backend_on_cpu(small_demo):
  out = small_demo.stdout
  assert re.search(r"^jax \S+ on cpu", out, re.M)
  lines = [l for l in out.splitlines() if l.startswith("backend")]
  assert len(lines) == 2  # dense Linears and MoE experts
  for line in lines:
    assert re.match(r"backend \([^)]*\): reference: .*pure-JAX reference", line), line
    assert "needs an NVIDIA GPU" in line
  assert "time per forward: skipped on cpu" in out


def test_demo_weight_bytes_match_hand_formula(small_demo):
  out = small_demo.stdout
  bf16, q, other = small_model_bytes(SMALL)
  assert (bf16, q) == (219136, 61708)  # the formula worked out on paper for SMALL
  m = re.search(r"weights of the (\d+) Linears: bf16 (\d+) B .*-> NVFP4 (\d+) B", out)
  assert m, out
  assert int(m.group(1)) == 4 + 3 + 4 + 2  # attention x2, dense MLP, stacked w13/w2
  assert (int(m.group(2)), int(m.group(3))) == (bf16, q)
  m = re.search(r"whole model .*: bf16 (\d+) B .*-> NVFP4 (\d+) B .*, ([\d.]+)x smaller", out)
  assert m, out
  assert (int(m.group(1)), int(m.group(2))) == (bf16 + other, q + other)
  assert float(m.group(3)) == pytest.approx((bf16 + other) / (q + other), abs=0.006)


def test_demo_errors_within_nvfp4_bounds(small_demo, rng):
  out = small_demo.stdout
  # The oracle's NVFP4 error on Gaussian weights (the demo draws its Linears from N(0, 1/K)).
  w = rng.standard_normal((256, 512)).astype(np.float32)
  codes, scales, gs = npref.quantize(w)
  packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
  e_w = np.linalg.norm(npref.dequantize(packed, scales, gs) - w) / np.linalg.norm(w)
  assert 0.08 < e_w < 0.11
  weight_err = _number(r"error of the weights themselves .*: ([\d.e+-]+)", out)
  assert weight_err == pytest.approx(e_w, rel=0.1)
  # Each sublayer chains two quantized Linears (error ~ sqrt(2) e_w) and attention/routing
  # amplify a little; the residual stream dilutes it. Bounds: more than e_w / 2 (the weights
  # were really quantized), less than 3 e_w.
  m = re.search(r"NVFP4 model vs the bf16 model: hidden states ([\d.e+-]+), logits ([\d.e+-]+)",
                out)
  assert m, out
  for err in map(float, m.groups()):
    assert e_w / 2 < err < 3 * e_w, out
  m = re.search(r"dequantized weights .*: hidden states ([\d.e+-]+), logits ([\d.e+-]+)", out)
  assert m, out
  for err in map(float, m.groups()):
    assert 0 < err < ROUNDING_MAX, out
  # The rounding bound holds because no token's experts differ between the two runs; the line
  # says how many do (a flipped choice would move the error far beyond rounding).
  routes = re.search(r"\((\d+) of (\d+) tokens' top-k experts differ", out)
  assert routes and routes.group(1) == "0" and int(routes.group(2)) > 0, out


def test_demo_progress_goes_to_stderr(small_demo):
  assert "quantizing 13 Linear weights" in small_demo.stderr
  assert "compiling" in small_demo.stderr
  assert "[demo]" not in small_demo.stdout


def _checkpoint_block_bytes(name: str) -> tuple[int, int]:
  """(bf16, NVFP4) bytes of the first MLP block, from the files (fixtures' own reader)."""
  tensors = fx.read_dir(fx.fixture(name))
  mlp = re.compile(r"^model\.layers\.0\.mlp\.(experts\.\d+\.)?(gate|up|down)_proj\."
                   r"(weight|weight_packed|weight_scale)$")
  bf16 = q = 0
  for tname, a in tensors.items():
    if mlp.match(tname):
      q += a.nbytes
      if a.dtype == np.uint8:  # packed codes [N, K/2]
        bf16 += 2 * a.shape[0] * a.shape[1] * 2
  experts = {int(m.group(1)) for t in tensors if (m := re.search(r"experts\.(\d+)\.", t))}
  # One float32 global scale per matrix as jax_nvfp4 holds them: gate/up stacked into w13 share
  # one per expert (and w2 one per expert); a dense MLP's three Linears one each.
  q += 4 * (2 * len(experts) if experts else 3)
  return bf16, q


@pytest.mark.parametrize("name,kind", [("modelopt_nvfp4_dense", "dense SwiGLU MLP"),
                                       ("ct_nvfp4a16_moe", "MoE, 4 experts top-2")])
def test_demo_checkpoint_block(name, kind):
  proc = _demo("--checkpoint", fx.fixture(name), "--tokens", "5")
  assert proc.returncode == 0, proc.stderr
  out = proc.stdout
  assert f"block: model.layers.0.mlp{'.experts' if 'MoE' in kind else ''}: {kind}" in out
  assert re.search(r"^backend: reference: ", out, re.M)
  producer = "modelopt NVFP4" if name.startswith("modelopt") else "compressed-tensors"
  assert producer in out
  if "MoE" in kind:
    assert "router model.layers.0.mlp.gate.weight" in out  # the checkpoint's own router
  bf16, q = _checkpoint_block_bytes(name)
  m = re.search(r"weights of the block: bf16 (\d+) B .*-> NVFP4 (\d+) B", out)
  assert m, out
  assert (int(m.group(1)), int(m.group(2))) == (bf16, q)
  err = _number(r"dequantized weights in bf16: ([\d.e+-]+)", out)
  assert 0 < err < ROUNDING_MAX


@pytest.mark.parametrize("argv,message", [
    (["--hidden", "500"], "--hidden must be a multiple of 16"),
    (["--intermediate", "1000"], "--intermediate must be a multiple of 16"),
    (["--hidden", "80", "--heads", "3"], "--hidden (80) must be a multiple of heads (3)"),
    (["--top-k", "9"], "--top-k (9) must be <= experts (8)"),
    (["--tokens", "0"], "--tokens must be >= 1"),
    (["--blocks", "0"], "--blocks must be a positive integer"),
    (["--limit", "-1"], "--limit must be > 0"),
    (["--checkpoint", "x", "--hidden", "64"], "--hidden sets the embedded model"),
    (["--hidden", "abc"], "invalid int value"),
])
def test_demo_bad_options_exit_2(argv, message, capsys):
  with pytest.raises(SystemExit) as e:
    main(["demo", *argv])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert message in err
  assert "Traceback" not in err


def test_demo_checkpoint_missing_or_unsupported(tmp_path, capsys):
  assert main(["demo", "--checkpoint", str(tmp_path / "nope")]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and "does not exist" in err
  (tmp_path / "config.json").write_text('{"model_type": "llama", "quantization_config": '
                                        '{"quant_method": "gptq"}}')
  assert main(["demo", "--checkpoint", str(tmp_path)]) == 2
  err = capsys.readouterr().err
  assert "error: " in err and "unsupported quant_method 'gptq'" in err
  assert "Traceback" not in err


def test_inspect_still_works(capsys):
  assert main(["inspect", fx.fixture("ct_nvfp4a16_moe")]) == 0
  out = capsys.readouterr().out
  assert "compressed-tensors" in out
  assert re.search(r"model\.layers\.0\.mlp\.experts\.w13\s+nvfp4\s+\[4, 96, 64\]", out)


@pytest.mark.gpu
def test_demo_on_gpu_uses_the_kernels_and_times_them():
  proc = _demo("--iters", "5", cpu=False)
  assert proc.returncode == 0, proc.stderr
  out = proc.stdout
  assert re.search(r"^backend \(attention \+ dense MLP Linears\): cuda: ", out, re.M), out
  assert "as prepared for the kernels" in out
  for name in ("nvfp4", "bf16"):
    assert _number(rf"time per forward \({name}\): ([\d.]+) us", out) > 0
  m = re.search(r"NVFP4 model vs the bf16 model: hidden states ([\d.e+-]+)", out)
  assert m and 0.04 < float(m.group(1)) < 0.3, out


# ----------------------------------------------------------------------------- env

def test_env_reports_the_cpu_host():
  """On a CPU: the versions, the device, what the build holds (the extension's own answer),
  the reference backend with its reason, and the JAX_NVFP4_* variables set; no GPU facts."""
  import jax
  from jax_nvfp4 import _ffi
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NVFP4_PDL="0")
  proc = subprocess.run([sys.executable, "-m", "jax_nvfp4", "env"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr
  out = proc.stdout
  assert out.startswith(f"jax_nvfp4 0.1.0, jax {jax.__version__}, "), out
  assert re.search(r"^device: cpu ", out, re.M), out
  if _ffi.cuda_kernels_built():
    assert f"kernels: built for {', '.join(_ffi.cuda_architectures())}; 6 FFI targets" in out
  else:
    assert "kernels: not built (" in out
  assert re.search(r"^backend \(dense\): reference: .*the device platform is cpu", out, re.M)
  assert re.search(r"^backend \(MoE\): reference: NVFP4 MoE \(swiglu\)", out, re.M)
  assert re.search(r"^environment: .*JAX_NVFP4_PDL=0", out, re.M)
  assert "loaded kernel code" not in out and "blocks per SM" not in out


@pytest.mark.gpu
def test_env_reports_the_gpu_launch_facts():
  """On a GPU: the loaded code, PDL and clusters as the extension reports them, the SM count
  and the blocks per SM of every token tile."""
  from jax_nvfp4 import _ffi
  proc = _cli("env", cpu=False)
  assert proc.returncode == 0, proc.stderr
  out = proc.stdout
  code = _ffi.loaded_code(1)
  assert re.search(rf"^loaded kernel code: sm_{code['arch']}\b", out, re.M), out
  assert f"overlapped launches (PDL) {'on' if code['pdl'] else 'off'}" in out
  assert f"SMs: {_ffi.sm_count()}; shared memory per block: {_ffi.smem_limit() // 1024} KB" in out
  rows = ", ".join(f"{8 * mt} rows {_ffi.blocks_per_sm(mt, True)}" for mt in (1, 2, 4, 8))
  assert f"dense GEMM blocks per SM by token tile: {rows}" in out
  assert re.search(r"^backend \(dense\): cuda: ", out, re.M), out


# ----------------------------------------------------------------------------- bench

@pytest.mark.parametrize("argv", [[], ["--quick"], ["--only", "dense", "--plot", "x.png"]])
def test_bench_without_gpu_exits_with_a_clear_message(argv):
  proc = _cli("bench", *argv)
  assert proc.returncode == 1
  assert proc.stdout == ""
  err = proc.stderr.strip()
  assert err.startswith("error: python -m jax_nvfp4 bench measures jax_nvfp4's CUDA kernels")
  assert "needs an NVIDIA GPU (CUDA), the device platform is cpu" in err
  assert "--allow-cpu" in err and len(err.splitlines()) == 1
  assert "Traceback" not in proc.stderr
  assert not os.path.exists(os.path.join(ROOT, "x.png"))


@pytest.mark.parametrize("argv,message", [
    (["--dense-shapes", "4096x"], "--dense-shapes: '4096x' is not 2 positive integers"),
    (["--dense-shapes", "100x64"], "--dense-shapes: K = 100 must be a multiple of 16"),
    (["--moe-shapes", "8x64x64"], "--moe-shapes: '8x64x64' is not 4 positive integers"),
    (["--moe-shapes", "4x64x40x2"], "H = 64 and I = 40 must be multiples of 16"),
    (["--moe-shapes", "4x64x64x5"], "top-k 5 exceeds E = 4"),
    (["--ms", "1,0"], "--ms: '1,0' is not a comma-separated list of positive integers"),
    (["--tokens", "a"], "--tokens: 'a' is not a comma-separated list"),
    (["--only", "attention"], "invalid choice: 'attention'"),
])
def test_bench_bad_options_exit_2(argv, message, capsys):
  with pytest.raises(SystemExit) as e:
    main(["bench", *argv])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert message in err
  assert "Traceback" not in err


@pytest.mark.gpu
def test_bench_on_gpu_tables_json_and_plot(tmp_path):
  pytest.importorskip("matplotlib")
  out, png = tmp_path / "bench.json", tmp_path / "bench.png"
  proc = _cli("bench", "--dense-shapes", "4096x4096", "--ms", "1,16", "--moe-shapes",
              "8x1024x512x2", "--tokens", "1,16", "--no-torch", "--json", str(out), "--plot",
              str(png), cpu=False)
  assert proc.returncode == 0, proc.stderr
  assert "grouped-GEMM kernel: yes" in proc.stdout
  assert "dense roofline table" in proc.stdout and "MoE roofline table" in proc.stdout
  result = json.loads(out.read_text())
  assert [r["m"] for r in result["dense"]["rows"]] == [1, 16]
  assert [r["tokens"] for r in result["moe"]["rows"]] == [1, 16] and result["moe"]["kernel"]
  assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
