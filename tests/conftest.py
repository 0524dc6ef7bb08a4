"""Test set-up: 8 fake CPU devices (before jax is imported), a persistent compilation cache,
and one prepared copy of the embedded default corpus shared by all tests and xdist workers."""

import fcntl
import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA:CPU compiles with LLVM at -O1 instead of -O3. Compiling is most of this suite's CPU time on
# a fresh machine; -O1 compiles ~35% faster and runs the tiny models' steps as fast. Measured on
# the 7 golden-loss cases: 6 train to bitwise the -O3 losses, memory differs by one float32 ulp
# at one step (the golden tolerance is 2e-5). Processes the tests start get these flags without
# the fake devices: {"XLA_FLAGS": os.environ["SPARSEJAX_TEST_XLA_FLAGS"]}.
CPU_ONLY = os.environ["JAX_PLATFORMS"] == "cpu"
os.environ["SPARSEJAX_TEST_XLA_FLAGS"] = "--xla_backend_optimization_level=1" if CPU_ONLY else ""
os.environ["XLA_FLAGS"] = " ".join(filter(None, (
    os.environ.get("XLA_FLAGS", ""), os.environ["SPARSEJAX_TEST_XLA_FLAGS"],
    "--xla_force_host_platform_device_count=8")))
# One BLAS thread per process: scipy's L-BFGS fits (scaling laws) ran 5-20x slower with two
# threads fighting over the two CI cores next to an xdist worker.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
REPO = pathlib.Path(__file__).resolve().parent.parent
CACHE = pathlib.Path(os.environ.get("SPARSEJAX_TEST_CACHE", REPO / ".cache"))
os.environ.setdefault("SPARSEJAX_DATA_DIR", str(CACHE / "datasets"))
# The persistent compilation cache, also for every subprocess a test starts (the CLIs, crash and
# multi-process children): on a fresh CI machine compiling is most of the suite's CPU time, and
# a child that finds its programs there skips it.
os.environ["JAX_COMPILATION_CACHE_DIR"] = str(CACHE / "jax-compile")
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# Property tests draw the same examples on every run (CI reproducibility); set
# HYPOTHESIS_PROFILE=explore locally to search with fresh random examples.
settings.register_profile("ci", derandomize=True, deadline=None)
settings.register_profile("explore", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture(scope="session")
def default_dataset() -> pathlib.Path:
  """The byte-level stdlib corpus, prepared once (file lock: xdist workers share it)."""
  from sparsejax.data import ensure_default_dataset
  CACHE.mkdir(parents=True, exist_ok=True)
  with open(CACHE / "datasets.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      return ensure_default_dataset("byte")
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture
def one_device():
  return jax.devices()[:1]


# CPU seconds per test file (one core, cold compile cache, -O1; measured one file at a time).
# Under `pytest -n 2 --dist loadfile` (whole files per worker, so module fixtures run once) the
# files are handed out in collection order: heaviest first, the short files at the end then even
# out the two workers' finishing times. A file missing here goes first (its cost is unknown; a
# long file early does no harm): add it with its measured time.
FILE_CPU_S = {
    "test_scan_layers.py": 95, "test_gather_sum_tpu.py": 20,
    "test_grouped_matmul_tpu.py": 22, "test_tpu_compile.py": 15, "test_fits.py": 25,
    "test_train.py": 190, "test_weight_sparsity.py": 170, "test_multiprocess.py": 140, "test_crash_safety.py": 110,
    "test_sparse_layers_work.py": 100, "test_moe.py": 85, "test_kernel_layers.py": 80,
    "test_sweep.py": 80, "test_block_sparse_kernel.py": 75, "test_sparse_attn_model.py": 65,
    "test_mesh_presets.py": 65, "test_peer_memory.py": 55, "test_sharding.py": 50,
    "test_model.py": 50, "test_gather_sum_kernel.py": 40, "test_scaling_report.py": 35,
    "test_pk_topk_kernel.py": 35, "test_optim_groups.py": 35, "test_extension_hooks.py": 35,
    "test_golden_losses.py": 30, "test_moe_fidelity.py": 30, "test_grouped_matmul_kernel.py": 30,
    "test_family_registry.py": 25, "test_block_masks.py": 15, "test_splash_bridge.py": 15,
    "test_block_sparse_dispatch.py": 10, "test_config.py": 10, "test_synthfacts.py": 12,
    "test_scaling_fit.py": 10, "test_launch.py": 5, "test_data.py": 5, "test_memory_whiten.py": 5,
    "test_scaling_inputs.py": 5, "test_architecture.py": 5, "test_sparsity_run.py": 45,
    "test_activation_sparsity.py": 30, "test_sparsity_laws.py": 20, "test_sparsity_masks.py": 15,
    "test_finetune.py": 35, "test_init_from.py": 20, "test_hf_convert.py": 20,
    "test_upcycle.py": 40, "test_gpu_compile.py": 15,
    "test_compile_check.py": 60, "test_chunked_loss.py": 16,
}


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
  if config.getoption("dist", "no") in ("loadfile", "loadscope"):
    items.sort(key=lambda item: -FILE_CPU_S.get(item.path.name, float("inf")))  # stable
