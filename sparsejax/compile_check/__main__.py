"""``python -m sparsejax.compile_check --config <file>:<preset> [--config.x=y ...] --target T``
(= ``sparsejax compile-check``): compile the real train step for a TPU slice or GPU nodes on this
host and print one JSON object (docs/compile_check.md).

    --target v5p-8 | v5p-256 | v5e-16 | v6e-64 | h100x8 | h200x8x4 ...  (sparsejax/parallel/
             targets.toml: <tpu>-<N> as Cloud TPU names slices, <gpu>x<gpus>[x<nodes>])
    --num_slices N      TPU slices joined by DCN (the mesh needs a dcn axis: mesh.preset=
                        multislice or mesh.dcn)
    --global_batch B    instead of config.data.global_batch_size
    --find_max_batch    bisect the largest per-device batch that fits
    --memory_fraction F GPU: the share of HBM the client may use (0.75, XLA's default)
    --vocab_size V      instead of the config's / tokenizer's vocabulary

Exit status: 0 the step fits, 2 it does not (the JSON says by how much), 1 an error (one line on
stderr). Progress goes to stderr, the JSON to stdout.
"""

from __future__ import annotations

import os

if not os.environ.get("JAX_PLATFORMS"):  # compile-only devices need no local accelerator;
  os.environ["JAX_PLATFORMS"] = "cpu"    # this must be set before jax starts

import json
import logging
import sys

import jax
from absl import flags
from ml_collections import config_flags

from sparsejax.cli_common import EXPECTED_ERRORS, setup_logging
from sparsejax.compile_check import devices as devlib, program
from sparsejax.configure import validate
from sparsejax.parallel import targets

PROG = "sparsejax compile-check"
EXIT_FITS, EXIT_ERROR, EXIT_DOES_NOT_FIT = 0, 1, 2
_log = logging.getLogger("sparsejax")

_FLAGS: dict = {}


def define_flags() -> None:
  """The command's flags (defined on first use, so importing this module defines none)."""
  if _FLAGS:
    return
  _FLAGS.update(
      config=config_flags.DEFINE_config_file("config", None, "Config file and preset",
                                             lock_config=True),
      target=flags.DEFINE_string("target", None, "Target slice / nodes, e.g. v5p-256, h100x8"),
      num_slices=flags.DEFINE_integer("num_slices", 1, "TPU slices joined by DCN"),
      global_batch=flags.DEFINE_integer("global_batch", 0, "Global batch (0: the config's)"),
      find_max_batch=flags.DEFINE_bool("find_max_batch", False,
                                       "Bisect the largest per-device batch that fits"),
      memory_fraction=flags.DEFINE_float("memory_fraction", program.DEFAULT_MEMORY_FRACTION,
                                         "GPU: share of HBM the XLA client may allocate"),
      vocab_size=flags.DEFINE_integer("vocab_size", 0,
                                      "Vocabulary (0: the config's / tokenizer's)"))


def _flag(name: str):
  return _FLAGS[name].value


def _gib(n: float) -> str:
  return f"{n / 2 ** 30:.2f} GiB"


def _describe(rec: dict) -> str:
  mem = rec["memory"]
  used = mem.get("peak_bytes", mem.get("required_bytes", 0))
  verdict = "fits" if rec["fits"] else "does NOT fit"
  return (f"per-device batch {rec['per_device_batch']:g} (global {rec['global_batch']}): "
          f"{verdict}, {_gib(used)} of {_gib(mem['limit_bytes'])}, "
          f"compiled in {rec['compile_s']:.1f} s")


def run() -> dict:
  """Parse the flags' values into a config and target, compile, return the record."""
  if _flag("config") is None or not _flag("target"):
    raise ValueError("--config <file>:<preset> and --target are required "
                     f"(targets: {', '.join(targets.names())})")
  cfg = validate(_flag("config"))
  if _flag("global_batch"):
    cfg = program.with_batch(cfg, _flag("global_batch"))
  if not 0 < _flag("memory_fraction") <= 1:
    raise ValueError(f"--memory_fraction: must be in (0, 1], got {_flag('memory_fraction')}")
  target = targets.parse(_flag("target"), _flag("num_slices"))
  _log.info("making the %d %s devices of %s (%s)", target.num_devices,
            target.chip.name, target.name, target.topology)
  devices = devlib.target_devices(target)
  kwargs = {"vocab": _flag("vocab_size"), "memory_fraction": _flag("memory_fraction")}
  if _flag("find_max_batch"):
    trial = iter(range(1, 1000))
    return program.find_max_batch(
        cfg, target, devices, **kwargs,
        log=lambda b, rec: _log.info("[%d] %s", next(trial), _describe(rec)))
  _log.info("compiling %s for %s (global batch %d, seq %d)", cfg.name, target.name,
            cfg.data.global_batch_size, cfg.data.seq_len)
  rec = program.check(cfg, target, devices, **kwargs)
  _log.info("%s", _describe(rec))
  return rec


def main(argv: list[str]) -> int:
  """Entry point (``sparsejax compile-check`` passes the arguments after the command)."""
  if {"-h", "--help", "--helpfull"} & set(argv):
    print(__doc__.strip())
    return EXIT_FITS
  define_flags()
  try:
    rest = flags.FLAGS([PROG] + list(argv))[1:]
    if rest:
      raise ValueError(f"unexpected arguments: {' '.join(rest)}")
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    text = " ".join(str(e.args[0] if e.args else e).split())
    print(f"{PROG}: error: bad flag: {text or type(e).__name__}", file=sys.stderr)
    return EXIT_ERROR
  setup_logging()
  try:
    rec = run()
  except (*EXPECTED_ERRORS, jax.errors.JaxRuntimeError, NotImplementedError) as e:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    print(f"{PROG}: error: {type(e).__name__}: {msg}", file=sys.stderr)
    return EXIT_ERROR
  print(json.dumps(rec))
  return EXIT_FITS if rec["fits"] else EXIT_DOES_NOT_FIT


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
