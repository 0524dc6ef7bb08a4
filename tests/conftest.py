"""Test set-up: 8 fake CPU devices (before jax is imported), a persistent compilation cache,
and one prepared copy of the embedded default corpus shared by all tests and xdist workers."""

import fcntl
import os
import pathlib

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One BLAS thread per process: scipy's L-BFGS fits (scaling laws) ran 5-20x slower with two
# threads fighting over the two CI cores next to an xdist worker.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
REPO = pathlib.Path(__file__).resolve().parent.parent
CACHE = pathlib.Path(os.environ.get("SPARSEJAX_TEST_CACHE", REPO / ".cache"))
os.environ.setdefault("SPARSEJAX_DATA_DIR", str(CACHE / "datasets"))

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# Property tests draw the same examples on every run (CI reproducibility); set
# HYPOTHESIS_PROFILE=explore locally to search with fresh random examples.
settings.register_profile("ci", derandomize=True, deadline=None)
settings.register_profile("explore", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

jax.config.update("jax_compilation_cache_dir", str(CACHE / "jax-compile"))
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
