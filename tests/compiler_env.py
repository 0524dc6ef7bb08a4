"""The deviceless compiler environments the compile tests run in (a subprocess each):

  tpu  libtpu        $SPARSEJAX_TPU_PYTHON, else <repo>/.tpu-compiler/ on PYTHONPATH (make test
                     installs it), else this Python when it can import libtpu
  gpu  CUDA plugin   $SPARSEJAX_GPU_PYTHON, else <repo>/.gpu-compiler/, else this Python when it
                     can import jax_plugins.xla_cuda13

Without one a test skips, or fails when SPARSEJAX_REQUIRE_<TPU|GPU>_COMPILE=1 (.ci/run sets
both, so the checks cannot silently vanish).
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
# Environment of the parent test process that must not reach the compiler: the fake CPU devices
# and -O1 CPU flags, and the persistent cache (a hit would skip the compile under test).
DROP = ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")
_ENVS = {"tpu": ("SPARSEJAX_TPU_PYTHON", ".tpu-compiler", "libtpu", "libtpu",
                 "pip install --no-deps --target .tpu-compiler libtpu==0.0.48.1"),
         "gpu": ("SPARSEJAX_GPU_PYTHON", ".gpu-compiler", "jax_plugins", "jax_plugins.xla_cuda13",
                 "pip install --no-deps --target .gpu-compiler jax-cuda13-plugin==0.11.2 "
                 "jax-cuda13-pjrt==0.11.2")}


def compiler(platform: str) -> tuple[str, dict]:
  """(python, extra env) of the compiler environment for ``platform``; skips (or fails when
  SPARSEJAX_REQUIRE_<TPU|GPU>_COMPILE=1) without one."""
  var, folder, marker, module, how = _ENVS[platform]
  if os.environ.get(var):
    return os.environ[var], {}
  if (REPO / folder / marker).is_dir():
    path = os.pathsep.join(filter(None, (str(REPO / folder), os.environ.get("PYTHONPATH"))))
    return sys.executable, {"PYTHONPATH": path}
  if importlib.util.find_spec(module.split(".")[0]) and importlib.util.find_spec(module):
    return sys.executable, {}
  why = f"no {platform.upper()} compiler environment: set {var} or {how}"
  if os.environ.get(f"SPARSEJAX_REQUIRE_{platform.upper()}_COMPILE") == "1":
    pytest.fail(why)
  pytest.skip(why)


def env(extra: dict) -> dict:
  out = {k: v for k, v in os.environ.items() if k not in DROP}
  out.update(extra, JAX_PLATFORMS="cpu")
  return out


def run(platform: str, argv: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
  """``python argv...`` in the repo, in ``platform``'s compiler environment."""
  python, extra = compiler(platform)
  return subprocess.run([python, *argv], cwd=REPO, env=env(extra), capture_output=True,
                        text=True, timeout=timeout)
