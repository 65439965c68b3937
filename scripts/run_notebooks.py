#!/usr/bin/env python3
"""Executes Jupyter notebooks without Jupyter: the standard library's json, plus matplotlib when a
notebook draws.

    python scripts/run_notebooks.py --inplace                 # notebooks/*.ipynb, outputs stored
    python scripts/run_notebooks.py --small --out /tmp/nb     # small sizes, copies in /tmp/nb
    python scripts/run_notebooks.py notebooks/01_quickstart.ipynb --out /tmp/nb

Each notebook (nbformat v4 JSON) runs in a fresh namespace of this process, its code cells in
order, with the notebook's directory as the working directory (as Jupyter does). Per code cell:

* stdout and stderr become ``stream`` outputs (in the order they were written);
* if the last statement is an expression whose value is not None, its ``repr`` becomes an
  ``execute_result`` (nothing when the cell's last line ends with ``;``, as in Jupyter);
* matplotlib runs with the Agg backend; ``plt.show()`` and the end of the cell turn every open
  figure into a ``display_data`` output (``image/png`` base64, plus ``text/plain``) and close it;
  ``display(obj)`` is available as in Jupyter (figures as PNG, anything else as its repr);
* ``execution_count`` is 1, 2, ... over the notebook's code cells.

On the first exception the notebook is written with the outputs so far (the failing cell ends
with an ``error`` output), the cell's index and traceback go to stderr, and the exit code is 1.
Without ``--inplace`` or ``--out DIR`` nothing is written (a check that the notebooks run).
``--small`` sets ``JAX_NVFP4_NOTEBOOK_SMALL=1``, which the notebooks' parameter cells read.
"""

from __future__ import annotations

import argparse
import ast
import base64
import builtins
import glob
import io
import json
import linecache
import os
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- outputs

class CellOutputs:
  """The outputs of one cell, in order; consecutive writes to one stream are merged."""

  def __init__(self):
    self.items: list[dict] = []

  def stream(self, name: str, text: str) -> None:
    if not text:
      return
    last = self.items[-1] if self.items else None
    if last is not None and last["output_type"] == "stream" and last["name"] == name:
      last["_text"] += text
    else:
      self.items.append({"output_type": "stream", "name": name, "_text": text})

  def add(self, output: dict) -> None:
    self.items.append(output)

  def to_json(self) -> list[dict]:
    out = []
    for item in self.items:
      if item["output_type"] == "stream":
        out.append({"output_type": "stream", "name": item["name"],
                    "text": _lines(item["_text"])})
      else:
        out.append(item)
    return out


class _Stream(io.TextIOBase):
  """A text stream that records what is written into the current cell's outputs."""

  def __init__(self, name: str, runner: "Runner", echo):
    self.name, self._runner, self._echo = name, runner, echo

  def writable(self) -> bool:
    return True

  def write(self, text) -> int:
    text = str(text)
    if self._runner.outputs is not None:
      self._runner.outputs.stream(self.name, text)
    if self._echo is not None:
      self._echo.write(text)
    return len(text)

  def flush(self) -> None:
    if self._echo is not None:
      self._echo.flush()

  def isatty(self) -> bool:
    return False

  @property
  def encoding(self):
    return "utf-8"


def _lines(text: str) -> list[str]:
  """nbformat's multiline string: a list of lines, each but the last ending with a newline."""
  return text.splitlines(keepends=True)


def _mime_text(value) -> dict:
  return {"text/plain": _lines(repr(value))}


# ----------------------------------------------------------------------------- figures

def _pyplot():
  """``matplotlib.pyplot`` if a notebook has imported it, else None (never imports it)."""
  return sys.modules.get("matplotlib.pyplot")


def _is_figure(value) -> bool:
  figure = sys.modules.get("matplotlib.figure")
  return figure is not None and isinstance(value, figure.Figure)


def _figure_output(fig, output_type: str = "display_data", count=None) -> dict:
  buf = io.BytesIO()
  fig.savefig(buf, format="png", bbox_inches="tight")
  width, height = fig.get_size_inches() * fig.dpi
  out = {"output_type": output_type,
         "data": {"image/png": base64.b64encode(buf.getvalue()).decode("ascii") + "\n",
                  "text/plain": [f"<Figure size {width:g}x{height:g} with "
                                 f"{len(fig.axes)} Axes>"]},
         "metadata": {}}
  if output_type == "execute_result":
    out["execution_count"] = count
  return out


# ----------------------------------------------------------------------------- running

class CellError(Exception):
  def __init__(self, index: int, text: str):
    super().__init__(text)
    self.index, self.text = index, text


class Runner:
  """Runs the code cells of one notebook in one namespace."""

  def __init__(self, name: str, echo: bool = False):
    self.name = name
    self.outputs: CellOutputs | None = None
    self.echo = echo
    self.namespace = {"__name__": "__main__", "__builtins__": builtins,
                      "display": self.display}

  # display() and plt.show() inside cells
  def display(self, *objs) -> None:
    for obj in objs:
      if _is_figure(obj):
        self.outputs.add(_figure_output(obj))
        plt = _pyplot()
        if plt is not None:
          plt.close(obj)
      else:
        self.outputs.add({"output_type": "display_data", "data": _mime_text(obj),
                          "metadata": {}})

  def flush_figures(self) -> None:
    plt = _pyplot()
    if plt is None or self.outputs is None:
      return
    for num in plt.get_fignums():
      fig = plt.figure(num)
      self.outputs.add(_figure_output(fig))
    plt.close("all")

  def _patch_pyplot(self) -> None:
    plt = _pyplot()
    if plt is not None and getattr(plt.show, "__name__", "") != "_notebook_show":
      def _notebook_show(*args, **kwargs):
        self.flush_figures()
      plt.show = _notebook_show

  def run_cell(self, index: int, count: int, source: str) -> list[dict]:
    """Executes one cell; returns its outputs. Raises CellError (outputs in ``.outputs``)."""
    self.outputs = CellOutputs()
    filename = f"<{self.name} cell {index}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    old_out, old_err = sys.stdout, sys.stderr
    sys.stdout = _Stream("stdout", self, old_out if self.echo else None)
    sys.stderr = _Stream("stderr", self, old_err if self.echo else None)
    try:
      try:
        if _pyplot() is None and "matplotlib" in source:
          try:  # so that plt.show() in this very cell is already ours
            import matplotlib.pyplot  # noqa: F401
          except ImportError:
            pass
        self._patch_pyplot()
        tree = ast.parse(source, filename)
        last = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
          last = ast.Expression(tree.body.pop().value)
        exec(compile(tree, filename, "exec"), self.namespace)  # noqa: S102
        self._patch_pyplot()
        if last is not None:
          value = eval(compile(last, filename, "eval"), self.namespace)  # noqa: S307
          self._patch_pyplot()
          quiet = source.rstrip().endswith(";")
          if value is not None and not quiet:
            if _is_figure(value):
              self.outputs.add(_figure_output(value, "execute_result", count))
              plt = _pyplot()
              if plt is not None:
                plt.close(value)
            else:
              self.outputs.add({"output_type": "execute_result", "execution_count": count,
                                "data": _mime_text(value), "metadata": {}})
        self.flush_figures()
      except BaseException as e:  # noqa: BLE001  (KeyboardInterrupt too: record, then stop)
        tb = traceback.format_exception(type(e), e, e.__traceback__)
        # Drop this runner's own frames: the traceback starts at the cell.
        cell_tb = [tb[0]] + [t for t in tb[1:] if "run_notebooks.py" not in t]
        self.outputs.add({"output_type": "error", "ename": type(e).__name__,
                          "evalue": str(e), "traceback": [t.rstrip("\n") for t in cell_tb]})
        raise CellError(index, "".join(cell_tb)) from None
    finally:
      sys.stdout, sys.stderr = old_out, old_err
    return self.outputs.to_json()


def _source(cell) -> str:
  src = cell.get("source", "")
  return "".join(src) if isinstance(src, list) else src


def run_notebook(path: str, out_path: str | None, *, echo: bool = False) -> tuple[bool, str]:
  """Executes ``path``; writes the result to ``out_path`` (if given). Returns (ok, message)."""
  with open(path, encoding="utf-8") as f:
    nb = json.load(f)
  if nb.get("nbformat") != 4:
    return False, f"{path}: not an nbformat v4 notebook (nbformat = {nb.get('nbformat')!r})"
  nb["nbformat_minor"] = max(int(nb.get("nbformat_minor", 0)), 5)
  name = os.path.basename(path)
  runner = Runner(name, echo=echo)
  cwd = os.getcwd()
  failure = None
  count = 0
  t0 = time.perf_counter()
  os.environ.setdefault("MPLBACKEND", "Agg")
  nb_dir = os.path.dirname(os.path.abspath(path))
  os.chdir(nb_dir)
  sys.path.insert(0, nb_dir)  # as a kernel started in the notebook's directory has it
  try:
    for index, cell in enumerate(nb.get("cells", [])):
      cell.setdefault("id", f"cell-{index}")
      cell.setdefault("metadata", {})
      if cell.get("cell_type") != "code":
        continue
      cell["outputs"] = []
      cell["execution_count"] = None
      if failure is not None:
        continue  # cells after the error stay unexecuted
      count += 1
      cell["execution_count"] = count
      t_cell = time.perf_counter()
      try:
        cell["outputs"] = runner.run_cell(index, count, _source(cell))
      except CellError as e:
        cell["outputs"] = runner.outputs.to_json()
        failure = e
      if echo:
        print(f"[run_notebooks] {name}: cell {index} done in {time.perf_counter() - t_cell:.1f} s",
              file=sys.stderr, flush=True)
  finally:
    os.chdir(cwd)
    if nb_dir in sys.path:
      sys.path.remove(nb_dir)
    plt = _pyplot()
    if plt is not None:
      plt.close("all")
  if out_path is not None:
    with open(out_path, "w", encoding="utf-8") as f:
      json.dump(nb, f, indent=1, ensure_ascii=False)
      f.write("\n")
  seconds = time.perf_counter() - t0
  if failure is not None:
    return False, (f"{path}: cell {failure.index} (code cell {count}) failed after "
                   f"{seconds:.1f} s:\n{failure.text}")
  return True, f"{path}: {count} code cells in {seconds:.1f} s" + (
      f" -> {out_path}" if out_path else "")


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                               epilog="See the module docstring for what is recorded.")
  ap.add_argument("notebooks", nargs="*",
                  help="notebooks or directories (default: the repository's notebooks/)")
  where = ap.add_mutually_exclusive_group()
  where.add_argument("--inplace", action="store_true", help="write the outputs into the files")
  where.add_argument("--out", metavar="DIR", help="write the executed notebooks into DIR")
  ap.add_argument("--small", action="store_true",
                  help="set JAX_NVFP4_NOTEBOOK_SMALL=1 (small sizes, CPU-friendly)")
  ap.add_argument("-v", "--verbose", action="store_true",
                  help="echo the cells' output and a line per cell to the console")
  args = ap.parse_args(argv)
  if args.small:
    os.environ["JAX_NVFP4_NOTEBOOK_SMALL"] = "1"
  os.environ.setdefault("MPLBACKEND", "Agg")
  paths = []
  for p in args.notebooks or [os.path.join(ROOT, "notebooks")]:
    if os.path.isdir(p):
      paths += sorted(glob.glob(os.path.join(p, "*.ipynb")))
    else:
      paths.append(p)
  if not paths:
    print("run_notebooks: no notebooks found", file=sys.stderr)
    return 2
  if args.out:
    os.makedirs(args.out, exist_ok=True)
  for path in paths:
    if not os.path.isfile(path):
      print(f"run_notebooks: {path}: no such file", file=sys.stderr)
      return 2
    out = (path if args.inplace else
           os.path.join(args.out, os.path.basename(path)) if args.out else None)
    ok, message = run_notebook(path, out, echo=args.verbose)
    print(f"[run_notebooks] {message}", file=sys.stderr if not ok else sys.stdout, flush=True)
    if not ok:
      return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
