"""Every Pallas GPU kernel compiles to a cubin for an H100, forward and forward+backward, on this
CPU host (deviceless: kernels_pallas/_aot.py), and a kernel the H100 cannot run is rejected
with the compiler's message.

The compiles run in a subprocess of the GPU compiler environment: jax plus the CUDA PJRT plugin
(``jax-cuda13-plugin`` + ``jax-cuda13-pjrt`` of jax's version, installed ``--no-deps``), found as
  * ``$SPARSEJAX_GPU_PYTHON``: a Python whose environment has the plugin, else
  * ``<repo>/.gpu-compiler/``: the two wheels installed with ``pip install --no-deps --target``,
    put on this Python's PYTHONPATH (no second copy of jax or the project), else
  * this Python itself when it can import the plugin.
Without one the compile tests skip, or fail when ``SPARSEJAX_REQUIRE_GPU_COMPILE=1`` (CI sets it,
so the checks cannot silently vanish). See docs/kernels.md, "Compile checks".
"""

from __future__ import annotations

import json

import pytest

import compiler_env
from kernels_pallas import _aot
from kernels_pallas._aot_cases import KERNELS

# A Pallas kernel whose operands need 512 KiB of shared memory (two 256x256 float32 tiles of one
# dot): more than an H100 block may opt into (232,448 bytes in _targets/h100.txtpb).
_TOO_BIG = """
import json, jax, jax.numpy as jnp
from jax.experimental import pallas as pl
from kernels_pallas import _aot
def kernel(x_ref, y_ref, o_ref):
  o_ref[...] = jnp.dot(x_ref[...], y_ref[...], preferred_element_type=jnp.float32)
a = jax.ShapeDtypeStruct((256, 256), jnp.float32)
fn = lambda x, y: pl.pallas_call(kernel, out_shape=a)(x, y)
print(json.dumps(_aot.compile_for_gpu(fn, (a, a)).asdict()))
"""


def _run(argv: list[str]):
  return compiler_env.run("gpu", argv)


@pytest.fixture(scope="module")
def small_rows(tmp_path_factory) -> dict[tuple[str, str], dict]:
  """benchmarks/kernel_compile.py --small: one small case per kernel, both directions."""
  out = tmp_path_factory.mktemp("kernel_compile") / "small.json"
  proc = _run(["benchmarks/kernel_compile.py", "--small", "--json", str(out)])
  if not out.exists():
    pytest.fail(f"kernel_compile.py wrote no JSON (exit {proc.returncode}): "
                f"{proc.stderr[-2000:]}")
  rows = json.loads(out.read_text())["rows"]
  assert proc.returncode == (0 if all(r["ok"] for r in rows) else 1), proc.stderr[-2000:]
  return {(r["kernel"], r["direction"]): r for r in rows}


@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_compiles_to_a_cubin_for_h100(small_rows, kernel):
  """Forward and forward+backward: no compiler error, the Pallas kernels are Triton custom calls
  in the optimised HLO (impl="pallas" really took the Triton path) and the executable holds
  device code."""
  for direction in ("fwd", "fwd+bwd"):
    row = small_rows[(kernel, direction)]
    assert row["ok"], f"{kernel} {direction} [{row['shape']}]: {row['message']}"
    assert row["cubins"] >= 1 and row["triton_kernels"] >= 1, row
  assert small_rows[(kernel, "fwd+bwd")]["triton_kernels"] >= small_rows[(kernel, "fwd")][
      "triton_kernels"]


def test_a_kernel_the_h100_cannot_run_is_rejected_with_the_compilers_message():
  proc = _run(["-c", _TOO_BIG])
  assert proc.returncode == 0, proc.stderr[-2000:]
  res = json.loads(proc.stdout.strip().splitlines()[-1])
  assert not res["ok"] and res["cubins"] == 0
  assert "Shared memory size limit exceeded" in res["message"], res["message"]
  assert "available: 232448" in res["message"], res["message"]      # the H100's opt-in limit
  assert "\n" not in res["message"]


def test_unknown_target_is_a_one_line_error():
  with pytest.raises(ValueError, match=r"unknown GPU target 'b200'; known: h100") as info:
    _aot.target_config("b200")
  assert "\n" not in str(info.value)


def test_short_message_keeps_the_compiler_error_line():
  exc = RuntimeError("INVALID_ARGUMENT: Failed to parse Triton module\n\n"
                     "  k.py:3:1: error: 'scf.for' op failed to verify\nstack trace...")
  msg = _aot.short_message(exc)
  assert msg == ("RuntimeError: INVALID_ARGUMENT: Failed to parse Triton module | "
                 "k.py:3:1: error: 'scf.for' op failed to verify")
  assert _aot.short_message(ValueError("one line")) == "ValueError: one line"
