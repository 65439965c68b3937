"""Mesh-axis entries of a PartitionSpec, shared by the dense and MoE sharding checks."""

from __future__ import annotations

import math


def axes(entry) -> tuple[str, ...]:
  """A spec entry (None, a name, or a tuple/list of names) as a tuple of names."""
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def entry(names: tuple[str, ...]):
  """Inverse of ``axes``: None, a single name, or a tuple of names."""
  return None if not names else names[0] if len(names) == 1 else tuple(names)


def size(mesh, names) -> int:
  """How many devices the axes ``names`` span together."""
  return math.prod(mesh.shape[a] for a in names)


def check_disjoint_axes(mesh, first, second, who: str, overlap: str) -> None:
  """``ValueError`` unless every name of ``first`` and ``second`` is an axis of ``mesh`` and the
  two share none (``overlap`` is the message for the latter)."""
  for a in first + second:
    if a not in mesh.shape:
      raise ValueError(f"{who}: {a!r} is not an axis of the mesh {dict(mesh.shape)}")
  if set(first) & set(second):
    raise ValueError(f"{who}: {overlap}")
