"""The Pallas TPU kernels compile for a TPU v5e and a v5p, forward and forward+backward, on this
CPU host (deviceless: kernels_pallas/_aot.py, libtpu's XLA:TPU compiler with Mosaic inside):
block-sparse attention through the splash bridge (a band mask and a dense-evaluated BigBird
mask) and the ``impl="mosaic"`` gather-sum / gather-dot / PEER / grouped-matmul kernels; a
kernel the chip cannot hold is rejected with the compiler's message.

The compiles run in a subprocess of the TPU compiler environment: jax plus libtpu, found as
  * ``$SPARSEJAX_TPU_PYTHON``: a Python whose environment has libtpu, else
  * ``<repo>/.tpu-compiler/``: ``pip install --no-deps --target .tpu-compiler libtpu`` (the
    version jax[tpu] pins), put on this Python's PYTHONPATH, else
  * this Python itself when it can import libtpu.
Without one the compile tests skip, or fail when ``SPARSEJAX_REQUIRE_TPU_COMPILE=1`` (CI sets it).
A kernel whose ops do not offer ``impl="mosaic"`` yet has no TPU case: its test skips, naming
it. See docs/kernels.md, "Compile checks".
"""

from __future__ import annotations

import json

import pytest

import compiler_env
from kernels_pallas import _aot
from kernels_pallas import _aot_cases as cases

CHIPS = ("v5e", "v5p")
# The VMEM a kernel's buffers may take, as libtpu states it when an allocation does not fit:
# 128 MiB on a v5e, 64 MiB on a v5p (what this libtpu reports; the chips differ, so the check
# also shows which chip was compiled for).
VMEM_BYTES = {"v5e": 134217728, "v5p": 67108864}

# One subprocess for the negative cases, both chips: a Pallas kernel with a 256 MiB VMEM scratch
# buffer (more than either chip has), and splash attention with 64-wide blocks (its kv blocks
# must be multiples of 128) next to the same case with splash_blocks' rounded blocks.
_REJECTS = """
import json, jax, jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from kernels_pallas import _aot, _aot_cases as cases
def kernel(x_ref, o_ref, big_ref):
  big_ref[0:8, :] = x_ref[...]
  o_ref[...] = big_ref[0:8, :] + 1
a = jax.ShapeDtypeStruct((8, 128), jnp.float32)
vmem = lambda x: pl.pallas_call(
    kernel, out_shape=a, scratch_shapes=[pltpu.VMEM((524288, 128), jnp.float32)])(x)
attn = lambda b: cases.block_sparse_case(seq=256, heads=2, kv_heads=2, head_dim=64,
                                         mask="causal", block_q=b[0], block_kv=b[1],
                                         impl="splash")
out = {}
for chip in %r:
  out[chip] = {"vmem": _aot.compile_for_tpu(vmem, (a,), chip=chip).asdict()}
  for name, blocks in (("splash64", (64, 64)), ("splash_rounded", cases.splash_blocks(64, 64))):
    case = attn(blocks)
    out[chip][name] = _aot.compile_for_tpu(case.backward, case.args, chip=chip).asdict()
print(json.dumps(out))
""" % (CHIPS,)


def _run(argv: list[str]):
  return compiler_env.run("tpu", argv)


@pytest.fixture(scope="module")
def small_rows(tmp_path_factory) -> dict[str, dict[tuple[str, str, str], dict]]:
  """benchmarks/kernel_compile.py --small --target <chip>: chip -> (kernel, shape, direction)
  -> row."""
  out = {}
  for chip in CHIPS:
    path = tmp_path_factory.mktemp("kernel_compile") / f"small-{chip}.json"
    proc = _run(["benchmarks/kernel_compile.py", "--small", "--target", chip, "--json",
                 str(path)])
    if not path.exists():
      pytest.fail(f"kernel_compile.py --target {chip} wrote no JSON (exit {proc.returncode}): "
                  f"{proc.stderr[-2000:]}")
    rec = json.loads(path.read_text())
    assert rec["device_kind"] == {"v5e": "TPU v5 lite", "v5p": "TPU v5"}[chip], rec
    rows = rec["rows"]
    assert proc.returncode == (0 if all(r["ok"] for r in rows) else 1), proc.stderr[-2000:]
    out[chip] = {(r["kernel"], r["shape"], r["direction"]): r for r in rows}
  return out


@pytest.fixture(scope="module")
def rejects() -> dict:
  proc = _run(["-c", _REJECTS])
  assert proc.returncode == 0, proc.stderr[-2000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("chip", CHIPS)
@pytest.mark.parametrize("kernel", cases.TPU_KERNELS)
def test_kernel_compiles_for_tpu(small_rows, chip, kernel):
  """Every small TPU case of ``kernel``, forward and forward+backward: no compiler error, and
  at least the case's count of Mosaic kernels in the optimised HLO (the TPU impl really took
  the Pallas TPU path: splash one kernel per call forward, plus dq and dkv backward)."""
  if not cases.tpu_impl_ready(kernel):
    pytest.skip(f"{kernel}: its ops have no TPU impl yet (no compile case; kernel_compile.py "
                "lists it under 'missing')")
  mine = [c for c in cases.tpu_small_cases() if c.kernel == kernel]
  assert mine, f"no small TPU case for {kernel}"
  rows = small_rows[chip]
  for case in mine:
    for direction, want in zip(("fwd", "fwd+bwd"), case.kernels):
      row = rows.get((kernel, case.shape, direction))
      assert row is not None, f"{chip}: no row for {kernel} {direction} [{case.shape}]"
      assert row["ok"] and not row["message"], f"{chip} {kernel} {direction}: {row['message']}"
      assert row["mosaic_kernels"] >= want, (chip, kernel, direction, row)
    assert (rows[(kernel, case.shape, "fwd+bwd")]["mosaic_kernels"]
            > rows[(kernel, case.shape, "fwd")]["mosaic_kernels"]), case.shape


def test_splash_cases_cover_a_band_and_a_dense_evaluated_mask():
  shapes = [c.shape for c in cases.tpu_small_cases() if c.kernel == "block_sparse_attention"]
  assert any("causal&window" in s for s in shapes) and any("bigbird" in s for s in shapes)


@pytest.mark.parametrize("chip", CHIPS)
def test_a_kernel_overflowing_vmem_is_rejected_with_the_compilers_message(rejects, chip):
  res = rejects[chip]["vmem"]
  assert not res["ok"] and res["kernels"] == 0 and res["target"] == chip
  assert res["message"].startswith("JaxRuntimeError: RESOURCE_EXHAUSTED"), res["message"]
  assert f"would exceed memory (size={VMEM_BYTES[chip]})" in res["message"], res["message"]
  assert "\n" not in res["message"]


@pytest.mark.parametrize("chip", CHIPS)
def test_splash_needs_blocks_of_128_and_splash_blocks_gives_them(rejects, chip):
  small, rounded = rejects[chip]["splash64"], rejects[chip]["splash_rounded"]
  assert not small["ok"] and "must be a multiple of 128" in small["message"], small
  assert rounded["ok"] and rounded["kernels"] >= 3, rounded


def test_splash_blocks_round_up_to_lane_multiples():
  assert cases.splash_blocks(16, 16) == (128, 128)
  assert cases.splash_blocks(128, 64) == (128, 128)
  assert cases.splash_blocks(256, 384) == (256, 384)
  assert cases.splash_blocks(200, 129) == (256, 256)


def test_unknown_tpu_chip_is_a_one_line_error():
  with pytest.raises(ValueError, match=r"unknown TPU chip 'v9'; known: v4, v5e, v5p, v6e") as e:
    _aot.tpu_device("v9")
  assert "\n" not in str(e.value)
