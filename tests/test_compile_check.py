"""``sparsejax compile-check``: the real train step compiled for a TPU slice (v5p-8) and an
8 x H100 node on this CPU host, the JSON it prints and its exit codes; plus the pieces it rests
on (target table, target-resolved layer choices, HLO collective counting, batch bisection).

The compiles run in a subprocess of a compiler environment:
  TPU  libtpu next to jax, found as ``$SPARSEJAX_TPU_PYTHON`` (a Python with libtpu), else
       ``<repo>/.tpu-compiler/`` (``pip install --no-deps --target .tpu-compiler
       libtpu==0.0.48.1``, put on PYTHONPATH), else this Python if it imports libtpu;
  GPU  the CUDA PJRT plugin: ``$SPARSEJAX_GPU_PYTHON``, else ``<repo>/.gpu-compiler/``, else
       this Python (as tests/test_gpu_compile.py).
Without one those tests skip, or fail when ``SPARSEJAX_REQUIRE_TPU_COMPILE=1`` /
``SPARSEJAX_REQUIRE_GPU_COMPILE=1`` (CI sets them). Shapes are tiny: the point is the
compiler's verdict, not the numbers.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

import compiler_env
from kernels_pallas.block_sparse_attention import tuning
from sparsejax.compile_check import hlo, program
from sparsejax.configure import load_config
from sparsejax.layers import kernel_impl
from sparsejax.parallel import hardware, targets
from sparsejax.train.state import model_spec

REPO = pathlib.Path(__file__).resolve().parent.parent
_compiler, _env = compiler_env.compiler, compiler_env.env


def _check(platform: str, *args: str) -> tuple[int, dict | None, str]:
  python, extra = _compiler(platform)
  proc = subprocess.run([python, "-m", "sparsejax.compile_check", *args], cwd=REPO,
                        env=_env(extra), capture_output=True, text=True, timeout=600)
  out = proc.stdout.strip()
  return proc.returncode, json.loads(out) if out else None, proc.stderr


def _sane(rec: dict, devices: int) -> None:
  mem = rec["memory"]
  assert rec["target"]["devices"] == devices and rec["mesh"]
  assert 0 < mem["argument_bytes"] and 0 < mem["peak_bytes"] <= mem["limit_bytes"]
  assert mem["limit_bytes"] <= mem["hbm_bytes"] == rec["target"]["hbm_bytes_per_device"]
  assert rec["flops_per_step_per_device"] > 0
  peak = rec["target"]["peak_bf16_tflops"] * 1e12
  assert rec["roofline_s"] == pytest.approx(rec["flops_per_step_per_device"] / peak)
  assert rec["compile_s"] > 0 and rec["collectives"]["unknown_trip_counts"] == 0


# ---- compiles for a TPU slice ----------------------------------------------------------------

def test_tpu_dense_fsdp_step_fits_with_fsdp_collectives():
  rc, rec, err = _check("tpu", "--config", "configs/dense.py:tiny", "--target", "v5p-8",
                        "--config.mesh.preset=fsdp", "--config.train.grad_accum_steps=4",
                        "--global_batch=16")
  assert rc == 0, err[-2000:]
  _sane(rec, 4)
  assert rec["fits"] and rec["mesh"] == {"data": 1, "fsdp": 4, "expert": 1, "tensor": 1}
  assert rec["per_device_batch"] == 1.0  # 16 sequences / 4 micro-batches / 4 shards
  kinds = rec["collectives"]["by_kind"]
  # FSDP, in each of the 4 micro-batches (3 of them in a loop XLA:TPU leaves unannotated): all 7
  # matmul weights of both layers gathered, gradients reduce-scattered (XLA:TPU's fusions)
  assert kinds["all-gather"]["count"] >= 4 * 2 * 7
  assert kinds["reduce-scatter"]["count"] >= 4 * 2 * 4
  assert rec["versions"]["libtpu"].startswith("0.0.")


def test_tpu_moe_expert_parallel_step_uses_all_to_all():
  rc, rec, err = _check("tpu", "--config", "configs/moe.py:tiny", "--target", "v5p-8",
                        "--config.mesh.preset=fsdp_ep")
  assert rc == 0, err[-2000:]
  _sane(rec, 4)
  assert rec["mesh"]["expert"] == 4 and rec["fits"]
  assert rec["collectives"]["by_kind"]["all-to-all"]["count"] >= 2 * 2  # dispatch + combine


def test_tpu_step_runs_the_mosaic_and_splash_kernels_in_scanned_layers():
  """memory.impl="pallas" on a TPU target = the Mosaic gather kernels; block-sparse attention =
  splash (the layer's 16-wide blocks rounded up to 128 for it); scanned layers around both."""
  rc, rec, err = _check("tpu", "--config", "configs/memory.py:tiny", "--target", "v5e-1",
                        "--config.memory.impl=pallas", "--config.attention.type=block_sparse",
                        "--config.attention.mask=causal&window:16", "--config.attention.block_q=16",
                        "--config.attention.block_kv=16", "--config.model.num_layers=4",
                        "--config.model.scan_layers=True")
  assert rc == 0, err[-2000:]
  _sane(rec, 1)
  # per step (loop trip counts included): splash forward + dq + dkv in each of the 4 layers
  # (once per kv head group: 24 here), the memory read's gather_sum and its d w gather_dot; the
  # same config with memory.impl=xla and dense attention has none
  assert rec["custom_calls"].get("tpu_custom_call", 0) >= 4 * 3 + 2, rec["custom_calls"]


def test_tpu_step_too_big_for_hbm_exits_2_with_the_compilers_numbers():
  rc, rec, err = _check("tpu", "--config", "configs/dense.py:tiny", "--target", "v5p-8",
                        "--config.mesh.preset=fsdp", "--config.model.d_model=16384",
                        "--config.model.num_layers=8")
  assert rc == 2, err[-2000:]
  assert rec["fits"] is False and "RESOURCE_EXHAUSTED" in rec["compiler_error"]
  mem = rec["memory"]
  assert mem["required_bytes"] > mem["available_bytes"] > 0.9 * mem["hbm_bytes"]
  assert "does NOT fit" in err


def test_tpu_mesh_is_jax_make_mesh_on_the_slice():
  """make_mesh over a target's devices = jax.make_mesh on that torus (the order a real run on
  the slice gets), not the devices reshaped in list order; tensor=4 lands on one torus axis."""
  python, extra = _compiler("tpu")
  code = (
      "import jax, numpy as np\n"
      "from sparsejax.compile_check import devices as d\n"
      "from sparsejax.config import MeshConfig\n"
      "from sparsejax.parallel import mesh, targets\n"
      "devs = d.target_devices(targets.parse('v5p-128'))\n"
      "m = mesh.make_mesh(MeshConfig(preset='fsdp_tp', tensor=4), devs)\n"
      "ref = jax.make_mesh((1, 16, 1, 4), ('data', 'fsdp', 'expert', 'tensor'), devices=devs)\n"
      "ids = lambda a: [x.id for x in a.devices.flat]\n"
      "print(ids(m) == ids(ref), ids(m) != [x.id for x in devs], dict(m.shape))\n")
  proc = subprocess.run([python, "-c", code], cwd=REPO, env=_env(extra), capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.split()[:2] == ["True", "True"], proc.stdout


# ---- compiles for an 8 x H100 node -------------------------------------------------------------

def test_gpu_dense_fsdp_step_fits_and_uses_cudnn_attention():
  """attention.impl="auto" resolves for the target: cuDNN's fused attention in the compiled
  step although the host is a CPU."""
  rc, rec, err = _check("gpu", "--config", "configs/dense.py:tiny", "--target", "h100x8",
                        "--config.mesh.preset=fsdp", "--config.model.compute_dtype=bfloat16")
  assert rc == 0, err[-2000:]
  _sane(rec, 8)
  assert rec["fits"] and rec["memory"]["memory_fraction"] == 0.75
  assert rec["memory"]["limit_bytes"] == int(0.75 * rec["memory"]["hbm_bytes"])
  assert rec["device_kind"].startswith("NVIDIA H100")
  assert rec["custom_calls"].get("__cudnn$fmhaSoftmax", 0) >= 2  # one per layer
  assert rec["custom_calls"].get("__cudnn$fmhaSoftmaxBackward", 0) >= 2
  kinds = rec["collectives"]["by_kind"]
  assert kinds["all-gather"]["count"] >= 1 and kinds["reduce-scatter"]["count"] >= 1


def test_gpu_moe_expert_parallel_step_compiles():
  rc, rec, err = _check("gpu", "--config", "configs/moe.py:tiny", "--target", "h100x8",
                        "--config.mesh.preset=fsdp_ep")
  assert rc == 0, err[-2000:]
  _sane(rec, 8)
  assert rec["mesh"]["expert"] == 4 and rec["mesh"]["fsdp"] == 2
  assert rec["collectives"]["by_kind"]["all-to-all"]["count"] >= 2


# ---- without a compiler ------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--target", "v9-8"], "is not a known target"),
    (["--target", "v5p-8", "--config.model.nope=1"], "bad flag"),
])
def test_errors_are_one_line_and_exit_1(args, message):
  proc = subprocess.run([sys.executable, "-m", "sparsejax.compile_check", "--config",
                         "configs/dense.py:tiny", *args], cwd=REPO, env=_env({}),
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1 and not proc.stdout
  lines = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
  assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]


def test_target_table_parses_names():
  t = targets.parse("v5p-256")
  assert (t.num_devices, t.topology, t.wrap, t.platform) == (128, "4x4x8", (True,) * 3, "tpu")
  assert targets.parse("v5e-16").topology == "4x4" and targets.parse("v6e-64").num_devices == 64
  t = targets.parse("v5p-8", num_slices=4)
  assert (t.num_devices, t.num_slices, t.chips_per_slice) == (16, 4, 4)
  g = targets.parse("h200x8x4")
  assert (g.num_devices, g.topology, g.chip.hbm_bytes) == (32, "1x4x8", 141_000_000_000)
  for name, slices, message in [("v5e-12", 1, "not a v5e slice"), ("v5p-7", 1, "multiple of"),
                                 ("h100x9", 1, "1..8 GPUs"), ("h100x8", 2, "--num_slices")]:
    with pytest.raises(ValueError, match=message):
      targets.parse(name, slices)


def test_peak_flops_come_from_the_table():
  """The MFU peaks are the target table's (same values as the table they replaced)."""
  assert hardware.peak_tflops("TPU v5 lite") == 197.0
  assert hardware.peak_tflops("TPU v5") == hardware.peak_tflops("TPU v5p") == 459.0
  assert hardware.peak_tflops("TPU v6 lite") == 918.0
  assert hardware.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
  assert hardware.peak_tflops("NVIDIA GH200 480GB") == 989.0
  assert hardware.peak_tflops("cpu") is None and hardware.peak_tflops("cpu", 5.0) == 5.0


def test_layer_choices_follow_the_target_platform():
  """Inside hardware.target(...) the device-dependent choices are the target's; outside they
  are this host's (CPU) as before."""
  cfg = load_config("configs/sparse_attn.py:tiny", **{
      "model.compute_dtype": "bfloat16", "attention.block_q": 0, "attention.block_kv": 0})
  dense = load_config("configs/dense.py:tiny", **{"model.compute_dtype": "bfloat16"})
  attn = lambda c: model_spec(c, 257).abstract_model.blocks[0].attn
  assert attn(dense).impl == "xla" and kernel_impl.resolve("pallas", "x", "gather") == "interpret"
  with hardware.target("gpu", "NVIDIA H100 80GB HBM3"):
    assert attn(dense).impl == "cudnn"
    assert kernel_impl.resolve("pallas", "x", "gmm") == "pallas"
    sparse = attn(cfg)
    h100 = tuning.choose("NVIDIA H100 80GB HBM3", sparse.head_dim, 256)
    assert sparse.block_config(256) == h100 and h100.num_warps  # the H100 row, Triton launch
    assert sparse.resolved_impl(64, 64) == "pallas"
  assert sparse.block_config(256) != h100  # this CPU host's choice
  with hardware.target("tpu", "TPU v5"):
    assert attn(dense).impl == "xla" and kernel_impl.resolve("pallas", "x", "topk") == "xla"
    # the Mosaic TPU kernels: gathers (memory / PEER reads) and the grouped matmul
    assert kernel_impl.resolve("pallas", "x", "gather") == kernel_impl.resolve(
        "pallas", "x", "gmm") == "mosaic"
    assert attn(cfg).resolved_impl(64, 64) == "splash"
  assert hardware.current().backend == "cpu" and attn(cfg).resolved_impl(64, 64) == "xla"


_HLO = """HloModule m

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[8]{0} get-tuple-element(%p), index=1
  %ar = f32[8]{0} all-reduce(%x), replica_groups={{0,1}}, to_apply=%add
  %one = s32[] constant(1)
  %n = s32[] add(%i, %one)
  ROOT %t = (s32[], f32[8]{0}) tuple(%n, %ar)
}

%cond (q: (s32[], f32[8])) -> pred[] {
  %q = (s32[], f32[8]{0}) parameter(0)
  %c = s32[] constant(5)
  %j = s32[] get-tuple-element(%q), index=0
  ROOT %lt = pred[] compare(%j, %c), direction=LT
}

%body2 (r: (s32[], f32[8])) -> (s32[], f32[8]) {
  %r = (s32[], f32[8]{0}) parameter(0)
  %i2 = s32[] get-tuple-element(%r), index=0
  %y = f32[8]{0} get-tuple-element(%r), index=1
  %cp = bf16[4,4]{1,0} collective-permute(%y), source_target_pairs={{0,1},{1,0}}
  ROOT %t2 = (s32[], f32[8]{0}) tuple(%i2, %y)
}

%all-reduce-scatter.3 (in: f32[16]) -> f32[8] {
  %in = f32[16]{0} parameter(0)
  %ar2 = f32[16]{0} all-reduce(%in), replica_groups={{0,1}}, to_apply=%add
  %off = s32[] constant(0)
  ROOT %ds = f32[8]{0} dynamic-slice(%ar2, %off), dynamic_slice_sizes={8}
}

ENTRY %main (x0: f32[16]) -> f32[16] {
  %x0 = f32[16]{0} parameter(0)
  %rs = f32[8]{0} reduce-scatter(%x0), dimensions={0}, to_apply=%add
  %two = s32[] constant(2)
  %two.c = s32[] copy(%two)
  %init = (s32[], f32[8]{0}) tuple(%two.c, %rs)
  %w = (s32[], f32[8]{0}) while(%init), condition=%cond, body=%body
  %w2 = (s32[], f32[8]{0}) while(%init), condition=%cond, body=%body2, backend_config={"known_trip_count":{"n":"7"}}
  %ags = ((f32[8]{0}), f32[16]{0}) all-gather-start(%rs), dimensions={0}
  %agd = f32[16]{0} all-gather-done(%ags)
  %tpu_rs = f32[8]{0} fusion(%x0), kind=kCustom, calls=%all-reduce-scatter.3
  %cc = f32[16]{0} custom-call(%agd), custom_call_target="__cudnn$fmhaSoftmax"
  ROOT %out = f32[16]{0} add(%cc, %x0)
}
"""


def test_collectives_count_loop_iterations_async_ops_and_the_larger_side():
  got = hlo.analyse(_HLO)
  kinds = got["collectives"]["by_kind"]
  assert kinds["all-reduce"] == {"count": 3, "bytes": 3 * 32}        # 5 - 2 iterations
  assert kinds["collective-permute"] == {"count": 7, "bytes": 7 * 32}  # known_trip_count
  assert kinds["reduce-scatter"] == {"count": 2, "bytes": 2 * 64}  # the operand; TPU's fusion
  assert kinds["all-gather"] == {"count": 1, "bytes": 64}              # start counted, not done
  assert got["collectives"]["unknown_trip_counts"] == 0
  assert got["custom_calls"] == {"__cudnn$fmhaSoftmax": 1}


def test_find_max_batch_bisects_to_the_largest_fitting_batch(monkeypatch):
  cfg = load_config("configs/dense.py:tiny")
  seen = []

  def fake_check(c, target, devices, **kw):
    b = c.data.global_batch_size // 2
    seen.append(b)
    return {"fits": b <= 37, "global_batch": c.data.global_batch_size}
  monkeypatch.setattr(program, "check", fake_check)
  monkeypatch.setattr(program, "batch_unit", lambda *a: 2)
  rec = program.find_max_batch(cfg, None, [])
  assert rec["max_per_device_batch"] == 37 and rec["global_batch"] == 74 and rec["fits"]
  assert seen[:7] == [1, 2, 4, 8, 16, 32, 64] and len(seen) == 7 + 5  # then bisection of 32..64
  monkeypatch.setattr(program, "check", lambda c, *a, **k: {"fits": False})
  rec = program.find_max_batch(cfg, None, [])
  assert rec["max_per_device_batch"] == 0 and rec["fits"] is False


def test_gpu_verdict_compares_the_peak_with_the_memory_fraction():
  mem = {"required_bytes": 90, "xla_peak_bytes": 70}
  assert program.verdict("gpu", dict(mem), 100, 0.75)[0]
  assert not program.verdict("gpu", dict(mem), 100, 0.5)[0]
  assert not program.verdict("gpu", {"required_bytes": 90, "xla_peak_bytes": 0}, 100, 0.75)[0]
  # TPU: the compiler's verdict; the peak reported is XLA's (what it checks), not the upper bound
  tpu = dict(mem)
  assert program.verdict("tpu", tpu, 100, 0.5)[0] and tpu["peak_bytes"] == 70
  no_peak = {"required_bytes": 90, "xla_peak_bytes": 0}
  assert program.verdict("tpu", no_peak, 100, 0.5)[0] and no_peak["peak_bytes"] == 90
