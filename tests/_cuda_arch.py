"""Which of a build's code CUDA runs on a GPU (for the launch-feature GPU tests)."""


def arch_the_driver_loads(archs, device: int) -> int:
  """CUDA's choice among a build's code for a GPU of arch ``device``: SASS built for ``a`` runs
  where the major version is the same and ``a <= device`` (an ``a``-suffixed arch only on
  itself); without such SASS the driver compiles the newest PTX with ``a <= device`` (again
  ``a``-suffixed only on itself). CMake's entries: ``"80"`` SASS and PTX, ``"80-real"`` SASS,
  ``"80-virtual"`` PTX."""
  sass, ptx = [], []
  for entry in archs:
    name, _, kind = entry.partition("-")
    a = int(name.rstrip("af"))
    fits = a == device if name.endswith("a") else a <= device
    if fits and kind in ("", "real") and a // 10 == device // 10:
      sass.append(a)
    if fits and kind in ("", "virtual"):
      ptx.append(a)
  return max(sass) if sass else max(ptx, default=0)
