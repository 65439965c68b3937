"""``quantize_model``: replace the ``nnx.Linear`` layers of a Flax NNX model by ``NVFP4Linear``."""

from __future__ import annotations

import dataclasses
import fnmatch

import jax
import numpy as np
from flax import nnx
from flax.nnx import graphlib

from jax_nvfp4.format import BLOCK_SIZE
from jax_nvfp4.nn import nnx as nvfp4_nnx
from jax_nvfp4.nn.nnx import NVFP4Linear

#: Layers the reference tools leave unquantized: the LM head and MoE routers (``router``,
#: ``gate``, ``shared_expert_gate``); ``gate_proj`` (an MLP projection) does not match ``*gate``.
DEFAULT_EXCLUDE = ("*lm_head*", "*router*", "*gate")


@dataclasses.dataclass(frozen=True)
class LayerReport:
  """One ``nnx.Linear`` found in the model.

  Attributes:
    path: module path, e.g. ``"layers/0/mlp/up_proj"``.
    in_features, out_features: the layer's shape (0 for a module handled by a converter).
    action: ``"quantized"``, ``"excluded"`` (by the patterns) or ``"skipped"`` (cannot be
      quantized, e.g. in_features not a multiple of 16).
    reason: why, in words.
    bytes_before: bytes of the float kernel (``in * out * itemsize``; the bias is not counted:
      it is unchanged).
    bytes_after: bytes of the NVFP4 weight if quantized, else ``bytes_before``.
  """

  path: str
  in_features: int
  out_features: int
  action: str
  reason: str
  bytes_before: int
  bytes_after: int


@dataclasses.dataclass(frozen=True)
class QuantizeReport:
  """What ``quantize_model`` did. ``bytes_before``/``bytes_after`` sum over every ``nnx.Linear``
  found (quantized or not), kernels only."""

  layers: tuple[LayerReport, ...]

  @property
  def bytes_before(self) -> int:
    return sum(l.bytes_before for l in self.layers)

  @property
  def bytes_after(self) -> int:
    return sum(l.bytes_after for l in self.layers)

  def paths(self, action: str) -> tuple[str, ...]:
    return tuple(l.path for l in self.layers if l.action == action)

  @property
  def quantized(self) -> tuple[str, ...]:
    return self.paths("quantized")

  @property
  def excluded(self) -> tuple[str, ...]:
    return self.paths("excluded")

  @property
  def skipped(self) -> tuple[str, ...]:
    return self.paths("skipped")

  def __str__(self) -> str:
    rows = [f"{l.path:40s} {l.in_features:>7d}x{l.out_features:<7d} {l.action:9s} "
            f"{l.bytes_before:>12,d} -> {l.bytes_after:>12,d}  {l.reason}" for l in self.layers]
    ratio = self.bytes_before / self.bytes_after if self.bytes_after else float("nan")
    rows.append(f"total: {self.bytes_before:,d} -> {self.bytes_after:,d} bytes "
                f"({ratio:.2f}x smaller), {len(self.quantized)} quantized, "
                f"{len(self.excluded)} excluded, {len(self.skipped)} skipped")
    return "\n".join(rows)


def _patterns(value, name: str) -> tuple[str, ...]:
  if isinstance(value, str):
    value = (value,)
  try:
    value = tuple(value)
  except TypeError:
    value = None
  if value is None or not all(isinstance(p, str) for p in value):
    raise TypeError(f"quantize_model: {name} must be a string or a sequence of fnmatch patterns, "
                    f"got {value!r}")
  return value


def _path_str(path) -> str:
  return "/".join(str(p) for p in path)


def _kernel_bytes(linear: nnx.Linear) -> int:
  k = linear.kernel.get_value()
  return int(np.prod(k.shape)) * np.dtype(k.dtype).itemsize


def _state_bytes(module) -> int:
  leaves = jax.tree.leaves(nnx.state(module))
  return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in leaves)


def quantize_model(model, *, include=("*",), exclude=DEFAULT_EXCLUDE, inplace: bool = False,
                   prepare: bool | str = "auto", backend: str = "auto", converters=None):
  """Replaces every matching ``nnx.Linear`` of ``model`` by ``NVFP4Linear.from_linear``.

  A Linear is quantized when its path (``"/"``-joined attribute names and list indices from the
  root, e.g. ``"layers/0/mlp/up_proj"``) matches one of ``include`` and none of ``exclude``
  (``fnmatch`` patterns, case-sensitive; ``*`` also matches ``/``). Layers whose in_features is
  not a multiple of 16 are skipped and reported, not an error. A Linear shared by several
  parents is converted once and replaced everywhere (reported under its first path).

  Args:
    model: an ``nnx.Module``.
    include, exclude: fnmatch patterns (a string or a sequence of strings). The default
      exclusions are ``DEFAULT_EXCLUDE`` (LM head, routers/gates); pass ``exclude=()`` for none.
    inplace: modify ``model`` itself; otherwise a deep copy (``nnx.clone``) is modified and
      ``model`` is left untouched.
    prepare, backend: passed to ``NVFP4Linear.from_linear`` (``"auto"``: the oracle decides).
    converters: optional mapping ``{module type: fn(module) -> new module or None}`` for other
      layer kinds, e.g. a model's own dense MoE block -> ``NVFP4MoE.from_dense(...)``. A module
      that is an instance of a key (first match in order) and whose path passes the patterns is
      replaced by ``fn``'s result (``None``: keep it and look inside). For such modules the
      report counts the bytes of all their variables (``nnx.state``) before and after.

  Returns:
    ``(model, report)``: the quantized model (``model`` itself when ``inplace``) and a
    ``QuantizeReport`` with per-layer and total kernel bytes before and after.
  """
  if not isinstance(model, nnx.Module):
    raise TypeError(f"quantize_model: model must be an nnx.Module, got {type(model).__name__}")
  include = _patterns(include, "include")
  exclude = _patterns(exclude, "exclude")
  if not isinstance(inplace, bool):
    raise TypeError(f"quantize_model: inplace must be a bool, got {inplace!r}")
  if not inplace:
    model = nnx.clone(model)

  converters = dict(converters or {})
  for t, fn in converters.items():
    if not isinstance(t, type) or not callable(fn):
      raise TypeError("quantize_model: converters must map module types to callables, got "
                      f"{t!r}: {fn!r}")
  reports: list[LayerReport] = []
  replaced: dict[int, object] = {}
  visited: set[int] = set()

  def convert(path: str, linear: nnx.Linear):
    before = _kernel_bytes(linear)
    entry = dict(path=path, in_features=linear.in_features, out_features=linear.out_features,
                 bytes_before=before)
    hit_in = next((p for p in include if fnmatch.fnmatchcase(path, p)), None)
    hit_ex = next((p for p in exclude if fnmatch.fnmatchcase(path, p)), None)
    if hit_in is None:
      reports.append(LayerReport(**entry, action="excluded", reason="matches no include pattern",
                                 bytes_after=before))
      return linear
    if hit_ex is not None:
      reports.append(LayerReport(**entry, action="excluded",
                                 reason=f"matches exclude pattern {hit_ex!r}", bytes_after=before))
      return linear
    if linear.in_features % BLOCK_SIZE:
      reports.append(LayerReport(**entry, action="skipped",
                                 reason=f"in_features = {linear.in_features} is not a multiple "
                                 f"of {BLOCK_SIZE}", bytes_after=before))
      return linear
    if nvfp4_nnx.is_abstract(linear.kernel.get_value()):
      raise TypeError(f"quantize_model: the Linear at {path!r} has an abstract kernel (a "
                      "jax.ShapeDtypeStruct, as nnx.eval_shape makes): there are no values to "
                      "quantize. For an abstract quantized model, quantize inside the abstract "
                      "evaluation: nnx.eval_shape(lambda: quantize_model(Model(...))[0])")
    new = NVFP4Linear.from_linear(linear, prepare=prepare, backend=backend)
    reports.append(LayerReport(**entry, action="quantized",
                               reason=f"NVFP4 ({new.backend.name} backend"
                               + (", kernel layout)" if new.prepared else ")"),
                               bytes_after=new.nbytes))
    return new

  def convert_other(path: str, module, fn):
    hit_in = any(fnmatch.fnmatchcase(path, p) for p in include)
    hit_ex = next((p for p in exclude if fnmatch.fnmatchcase(path, p)), None)
    if not hit_in or hit_ex is not None:
      return module
    new = fn(module)
    if new is None or new is module:
      return module
    if not isinstance(new, nnx.Module):
      raise TypeError(f"quantize_model: the converter for {type(module).__name__} returned "
                      f"{type(new).__name__}, not an nnx.Module")
    before, after = _state_bytes(module), _state_bytes(new)
    reports.append(LayerReport(path=path, in_features=0, out_features=0, action="quantized",
                               reason=f"{type(module).__name__} -> {type(new).__name__} "
                               "(all variables counted)", bytes_before=before,
                               bytes_after=after))
    return new

  def walk(node, path: tuple):
    visited.add(id(node))
    impl = graphlib.get_node_impl(node)
    if impl is None:
      return
    for key, child in list(impl.node_dict(node).items()):
      fn = next((f for t, f in converters.items() if isinstance(child, t)), None)
      if isinstance(child, nnx.Linear) or fn is not None:
        if id(child) not in replaced:
          child_path = _path_str((*path, key))
          replaced[id(child)] = (convert(child_path, child) if fn is None
                                 else convert_other(child_path, child, fn))
        new = replaced[id(child)]
        if new is child and fn is not None and id(child) not in visited:
          walk(child, (*path, key))
        if new is not child:
          if impl.set_key is None:
            raise TypeError(f"quantize_model: cannot replace the Linear at "
                            f"{_path_str((*path, key))!r}: its parent, a "
                            f"{type(node).__name__}, is immutable (hold the layers in an "
                            "nnx.List)")
          impl.set_key(node, key, new)
      elif (graphlib.is_node(child) and not isinstance(child, nnx.Variable)
            and id(child) not in visited):
        walk(child, (*path, key))

  if isinstance(model, nnx.Linear):  # the root itself: nothing holds it, return its replacement
    return convert("", model), QuantizeReport(tuple(reports))
  walk(model, ())
  return model, QuantizeReport(tuple(reports))
