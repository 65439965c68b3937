"""The machine code (SASS) of the built CUDA extension: tensor-core instructions in every GEMM
instantiation (wgmma's HGMMA where the tile engine takes that path on sm_90a, mma.sync's HMMA
elsewhere) and no local memory (spills or stack arrays) in any kernel. Runs wherever the extension
was built with CUDA and cuobjdump is on the PATH (CI's CPU machine included); skips otherwise."""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest

#: nvfp4_kernel<T, MT, kMoe, KS> as the compiler mangles it.
GEMM = re.compile(r"nvfp4_kernelI(13__nv_bfloat16|6__half)Li(\d+)ELb([01])ELi(\d+)E")


def sass_functions(path: str, arch: str) -> dict[str, str]:
  """{mangled name: SASS text} of the functions built for ``arch`` in ``path``."""
  tool = shutil.which("cuobjdump")
  if tool is None:
    pytest.skip("cuobjdump is not on the PATH")
  out = subprocess.run([tool, "-sass", "-arch", arch, path], capture_output=True, text=True)
  if out.returncode != 0 or "Function :" not in out.stdout:
    pytest.skip(f"no {arch} code in {path}: {out.stderr.strip()[:200]}")
  funcs = {}
  for block in re.split(r"\n\s*Function : ", out.stdout)[1:]:
    name, body = block.split("\n", 1)
    funcs[name.strip()] = body
  return funcs


def extension_path() -> str:
  c = pytest.importorskip("jax_nvfp4._C")
  if not c.built_with_cuda():
    pytest.skip("the extension was built without CUDA")
  return c.__file__


def uses_wgmma(arch: str, m_tile: int, k_slices: int) -> bool:
  """csrc/nvfp4_tile.cuh use_wgmma: sm_90a code, unsliced m_tile 4 and 8."""
  return arch == "sm_90a" and k_slices == 1 and m_tile in (4, 8)


@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_every_gemm_instantiation_runs_on_tensor_cores(arch):
  funcs = sass_functions(extension_path(), arch)
  gemms = {name: GEMM.search(name) for name in funcs if GEMM.search(name)}
  # dense + MoE, bf16 + fp16, m_tile 1/2/4/8, and the k-sliced decode instantiations
  assert len(gemms) >= 16, sorted(funcs)
  for name, match in gemms.items():
    m_tile, k_slices = int(match.group(2)), int(match.group(4))
    body = funcs[name]
    if uses_wgmma(arch, m_tile, k_slices):
      # one wgmma per k16 step of a 4-chunk unit, no mma.sync left on the path
      assert len(re.findall(r"\bHGMMA\.64x", body)) >= 16, name
      assert "HMMA" not in body, name
    else:
      assert re.search(r"\bHMMA\.16816\.F32", body), name
      assert "HGMMA" not in body, name


@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_no_kernel_touches_local_memory(arch):
  funcs = sass_functions(extension_path(), arch)
  for name, body in funcs.items():
    assert not re.search(r"\b(LDL|STL)(\.\w+)*\s", body), f"local memory in {name}"


#: An LDGSTS (cp.async) whose cache-policy operand is a uniform register: ``desc[URn]``.
LDGSTS_DESC = re.compile(r"\bLDGSTS\S*\s.*?desc\[UR(\d+)\]")
#: A SASS instruction (optionally predicated) and its first operand, the destination.
INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][\w.]*)\s+([^,;\s]+)")


@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_every_copy_descriptor_register_is_written(arch):
  """ptxas 13.0 has emitted LDGSTS with a cache-policy descriptor in a uniform register that no
  instruction of the kernel writes (an illegal instruction at run time: NOTES_dense.md v8, v14).
  Every ``desc[URn]`` an LDGSTS names must be the destination of some instruction (n and n+1:
  the descriptor is 64 bits)."""
  funcs = sass_functions(extension_path(), arch)
  checked = 0
  for name, body in funcs.items():
    written = set()
    for opcode, dst in INSTRUCTION.findall(body):
      m = re.fullmatch(r"UR(\d+)", dst)
      if m:
        written.add(int(m.group(1)))
        if ".64" in opcode:
          written.add(int(m.group(1)) + 1)
    for n in map(int, LDGSTS_DESC.findall(body)):
      checked += 1
      assert {n, n + 1} <= written, f"{name}: LDGSTS reads descriptor UR{n}, never written"
  assert checked > 0, "no LDGSTS with a descriptor found: the pattern no longer matches"
