"""The notebooks run: scripts/run_notebooks.py executes them on the CPU at their small sizes
(JAX_NVFP4_NOTEBOOK_SMALL=1) into a temporary directory, so they never rot; and the runner itself
records what Jupyter would (streams, results, figures, errors) as valid nbformat v4.

Needs matplotlib (the notebooks plot); skipped cleanly without it.
"""

import base64
import glob
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = os.path.join(ROOT, "scripts", "run_notebooks.py")
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))
NAMES = [os.path.basename(p) for p in NOTEBOOKS]
#: Notebooks that draw, and how many figures each draws at least.
PLOTS = {"02_moe.ipynb": 2, "04_performance.ipynb": 3}
PNG = b"\x89PNG\r\n\x1a\n"

needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                                      reason="matplotlib is not installed (pip install matplotlib)")


def _run(*args: str, small: bool = True) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu", MPLBACKEND="Agg")
  if small:
    env["JAX_NVFP4_NOTEBOOK_SMALL"] = "1"
  # The notebooks run from notebooks/: make this checkout's jax_nvfp4 the one they import.
  env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
  return subprocess.run([sys.executable, RUNNER, *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=900, check=False)


# ----------------------------------------------------------------------------- nbformat v4

_CELL_KEYS = {"code": {"id", "cell_type", "metadata", "source", "outputs", "execution_count"},
              "markdown": {"id", "cell_type", "metadata", "source"},
              "raw": {"id", "cell_type", "metadata", "source"}}
_OUTPUT_KEYS = {"stream": {"output_type", "name", "text"},
                "display_data": {"output_type", "data", "metadata"},
                "execute_result": {"output_type", "data", "metadata", "execution_count"},
                "error": {"output_type", "ename", "evalue", "traceback"}}


def _multiline(v) -> bool:
  return isinstance(v, str) or (isinstance(v, list) and all(isinstance(s, str) for s in v))


def check_nbformat_v4(nb: dict) -> None:
  """The parts of the nbformat 4.5 schema our notebooks use (no extra keys anywhere), and the
  real validator too when nbformat happens to be installed."""
  assert set(nb) == {"cells", "metadata", "nbformat", "nbformat_minor"}
  assert nb["nbformat"] == 4 and nb["nbformat_minor"] >= 5 and isinstance(nb["metadata"], dict)
  ids = set()
  for cell in nb["cells"]:
    kind = cell["cell_type"]
    assert set(cell) == _CELL_KEYS[kind], cell
    assert re.fullmatch(r"[a-zA-Z0-9-_]{1,64}", cell["id"]) and cell["id"] not in ids
    ids.add(cell["id"])
    assert isinstance(cell["metadata"], dict) and _multiline(cell["source"])
    if kind != "code":
      continue
    assert cell["execution_count"] is None or isinstance(cell["execution_count"], int)
    for out in cell["outputs"]:
      kind = out["output_type"]
      assert set(out) == _OUTPUT_KEYS[kind], out
      if kind == "stream":
        assert out["name"] in ("stdout", "stderr") and _multiline(out["text"])
      elif kind == "error":
        assert isinstance(out["ename"], str) and isinstance(out["evalue"], str)
        assert all(isinstance(t, str) for t in out["traceback"])
      else:
        assert isinstance(out["metadata"], dict) and out["data"]
        assert all(_multiline(v) for v in out["data"].values())
        if kind == "execute_result":
          assert isinstance(out["execution_count"], int)
  if importlib.util.find_spec("nbformat") is not None:
    import nbformat
    nbformat.validate(nbformat.from_dict(nb))


def _images(nb: dict) -> list[bytes]:
  return [base64.b64decode(out["data"]["image/png"]) for cell in nb["cells"]
          for out in cell.get("outputs", []) if "image/png" in out.get("data", {})]


def _text(nb: dict) -> str:
  parts = []
  for cell in nb["cells"]:
    for out in cell.get("outputs", []):
      if out["output_type"] == "stream":
        parts.append("".join(out["text"]))
  return "".join(parts)


# ----------------------------------------------------------------------------- the notebooks

def test_the_four_notebooks_exist_with_a_parameters_cell():
  assert NAMES == ["01_quickstart.ipynb", "02_moe.ipynb", "03_checkpoints.ipynb",
                   "04_performance.ipynb"]
  for path in NOTEBOOKS:
    with open(path, encoding="utf-8") as f:
      nb = json.load(f)
    check_nbformat_v4(nb)
    first = next(c for c in nb["cells"] if c["cell_type"] == "code")
    src = "".join(first["source"])
    assert src.lstrip().startswith("# Parameters"), (path, src)
    assert 'SMALL = os.environ.get("JAX_NVFP4_NOTEBOOK_SMALL", "0") == "1"' in src, path


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
  out = tmp_path_factory.mktemp("notebooks")
  proc = _run("--out", str(out))
  assert proc.returncode == 0, proc.stdout + proc.stderr
  nbs = {}
  for name in NAMES:
    with open(out / name, encoding="utf-8") as f:
      nbs[name] = json.load(f)
  return proc, nbs


@needs_matplotlib
def test_notebooks_run_on_cpu_at_small_sizes(executed):
  proc, nbs = executed
  assert sorted(nbs) == NAMES
  for name in NAMES:
    assert re.search(rf"{re.escape(name)}: \d+ code cells in [\d.]+ s", proc.stdout), proc.stdout


@needs_matplotlib
@pytest.mark.parametrize("name", NAMES)
def test_executed_notebook_is_valid_and_complete(executed, name):
  nb = executed[1][name]
  check_nbformat_v4(nb)
  code = [c for c in nb["cells"] if c["cell_type"] == "code"]
  assert [c["execution_count"] for c in code] == list(range(1, len(code) + 1))
  assert not [o for c in code for o in c["outputs"] if o["output_type"] == "error"]
  assert "Traceback" not in _text(nb)


@needs_matplotlib
@pytest.mark.parametrize("name,count", sorted(PLOTS.items()))
def test_plot_notebooks_store_png_figures(executed, name, count):
  images = _images(executed[1][name])
  assert len(images) >= count
  for png in images:
    assert png.startswith(PNG) and len(png) > 5000


@needs_matplotlib
def test_performance_notebook_says_its_numbers_are_cpu_numbers(executed):
  text = _text(executed[1]["04_performance.ipynb"])
  assert "CPU NUMBERS" in text
  assert re.search(r"copy bandwidth .*: \d+ GB/s", text)
  assert "nvfp4 us" in text and "ragged us" in text  # both roofline tables


# ----------------------------------------------------------------------------- the runner

def _notebook(*sources: str, markdown_first: bool = True) -> dict:
  cells = [{"cell_type": "markdown", "metadata": {}, "source": ["# title\n", "text"]}]
  cells = cells if markdown_first else []
  for src in sources:
    cells.append({"cell_type": "code", "execution_count": 7, "metadata": {},
                  "outputs": [{"output_type": "stream", "name": "stdout", "text": "stale"}],
                  "source": src})
  return {"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 4}


def _write(path, nb) -> str:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(nb, f)
  return str(path)


def _outputs(nb, i):
  return [c for c in nb["cells"] if c["cell_type"] == "code"][i]["outputs"]


def test_runner_records_streams_results_and_display(tmp_path):
  src = _write(tmp_path / "a.ipynb", _notebook(
      "import sys\nprint('out 1')\nprint('err', file=sys.stderr)\nprint('out 2')\nx = 20\nx + 1",
      "x;",
      "y = {'k': [1, 2]}\ndisplay(y)\ny",
      "import os\nos.path.isfile('a.ipynb')",
      "None"))
  proc = _run(src, "--inplace", small=False)
  assert proc.returncode == 0, proc.stderr
  with open(src, encoding="utf-8") as f:
    nb = json.load(f)
  check_nbformat_v4(nb)
  assert _outputs(nb, 0) == [
      {"output_type": "stream", "name": "stdout", "text": ["out 1\n"]},
      {"output_type": "stream", "name": "stderr", "text": ["err\n"]},
      {"output_type": "stream", "name": "stdout", "text": ["out 2\n"]},
      {"output_type": "execute_result", "execution_count": 1, "data": {"text/plain": ["21"]},
       "metadata": {}}]
  assert _outputs(nb, 1) == []  # a trailing ';' hides the value
  assert [o["output_type"] for o in _outputs(nb, 2)] == ["display_data", "execute_result"]
  assert _outputs(nb, 2)[1]["data"]["text/plain"] == ["{'k': [1, 2]}"]
  assert _outputs(nb, 3)[0]["data"]["text/plain"] == ["True"]  # runs in the notebook's dir
  assert _outputs(nb, 4) == []
  assert nb["cells"][1]["execution_count"] == 1 and nb["cells"][5]["execution_count"] == 5


@needs_matplotlib
def test_runner_captures_figures_in_order(tmp_path):
  src = _write(tmp_path / "fig.ipynb", _notebook(
      "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nprint('before')\nplt.show()\n"
      "print('after')\nfig = plt.figure()\nplt.bar([0, 1], [2, 1]);",
      "plt.get_fignums()"))
  out = tmp_path / "out"
  proc = _run(src, "--out", str(out), small=False)
  assert proc.returncode == 0, proc.stderr
  with open(out / "fig.ipynb", encoding="utf-8") as f:
    nb = json.load(f)
  check_nbformat_v4(nb)
  kinds = [(o["output_type"], o.get("name")) for o in _outputs(nb, 0)]
  assert kinds == [("stream", "stdout"), ("display_data", None), ("stream", "stdout"),
                   ("display_data", None)]
  assert all(png.startswith(PNG) for png in _images(nb))
  assert _outputs(nb, 0)[1]["data"]["text/plain"][0].startswith("<Figure size")
  assert _outputs(nb, 1)[0]["data"]["text/plain"] == ["[]"]  # figures are closed once shown


def test_runner_stops_at_the_first_error(tmp_path):
  src = _write(tmp_path / "bad.ipynb", _notebook(
      "print('fine')", "def f():\n  raise ValueError('boom')\n\nf()", "print('never')"))
  out = tmp_path / "out"
  proc = _run(src, "--out", str(out), small=False)
  assert proc.returncode == 1
  assert "bad.ipynb: cell 2 (code cell 2) failed" in proc.stderr
  assert "ValueError: boom" in proc.stderr and 'File "<bad.ipynb cell 2>", line 2, in f' in (
      proc.stderr)
  with open(out / "bad.ipynb", encoding="utf-8") as f:
    nb = json.load(f)
  check_nbformat_v4(nb)
  err = _outputs(nb, 1)[-1]
  assert (err["output_type"], err["ename"], err["evalue"]) == ("error", "ValueError", "boom")
  assert _outputs(nb, 2) == [] and nb["cells"][3]["execution_count"] is None


def test_runner_without_destination_writes_nothing(tmp_path):
  nb = _notebook("1 + 1")
  src = _write(tmp_path / "c.ipynb", nb)
  proc = _run(src, small=False)
  assert proc.returncode == 0, proc.stderr
  with open(src, encoding="utf-8") as f:
    assert json.load(f) == nb
