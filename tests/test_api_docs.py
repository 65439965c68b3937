"""Every public name the package exports is documented: classes and functions carry a docstring
that states their semantics (shapes, dtypes and layouts for the array functions)."""

import inspect

import pytest

import jax_nvfp4
import jax_nvfp4.bench
import jax_nvfp4.checkpoint
import jax_nvfp4.nn

#: Array functions of the top level whose docstrings must give shapes and dtypes.
ARRAY_FUNCTIONS = ("dequantize", "dequantize_blocks", "nvfp4_matmul", "pack_fp4", "unpack_fp4", "quantize",
                   "reference_matmul", "prepare", "unprepare", "route", "route_and_align", "align_tokens",
                   "apply_activation", "deinterleave_gate_up", "fused_moe", "nvfp4_moe_gemm")
DTYPE_WORDS = ("uint8", "uint32", "float32", "bf16", "bfloat16", "float", "int32", "integer")


def _exports():
  for module in (jax_nvfp4, jax_nvfp4.nn, jax_nvfp4.checkpoint):
    for name in module.__all__:
      obj = getattr(module, name)
      if inspect.isclass(obj) or inspect.isfunction(obj):
        yield f"{module.__name__}.{name}", obj


@pytest.mark.parametrize("name,obj", list(_exports()), ids=lambda v: v if isinstance(v, str) else "")
def test_export_has_a_docstring(name, obj):
  doc = inspect.getdoc(obj)
  assert doc and len(doc) >= 40, f"{name} needs a docstring stating its semantics"


@pytest.mark.parametrize("name", ARRAY_FUNCTIONS)
def test_array_function_docstring_gives_shapes_and_dtypes(name):
  doc = inspect.getdoc(getattr(jax_nvfp4, name))
  assert "[" in doc, f"{name}: no shape in its docstring"
  assert any(w in doc for w in DTYPE_WORDS), f"{name}: no dtype in its docstring"


def test_all_names_exist():
  for module in (jax_nvfp4, jax_nvfp4.nn, jax_nvfp4.checkpoint, jax_nvfp4.bench):
    for name in module.__all__:
      assert hasattr(module, name), (module.__name__, name)
