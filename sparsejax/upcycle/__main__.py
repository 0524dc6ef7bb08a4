r"""``python -m sparsejax.upcycle`` (= ``sparsejax upcycle``): a dense run -> an MoE run's step 0.

    python -m sparsejax.upcycle --from runs/dense:300 --config configs/moe.py:tiny \
        --config.moe.dispatch=dropless --out runs/moe-up [--mode copy|granular] [--noise 1e-3] \
        [--router_init auto|zero|normal] [--seed 0] [--allow_inexact]
    python -m sparsejax.train --config configs/workdir.py:runs/moe-up --workdir runs/moe-up

The target config must agree with the source outside the FFNs (model.*, attention.*, the
vocabulary); what the modes do and when the MoE equals the dense model at step 0:
sparsejax/upcycle/mapping.py. ``main(argv) -> exit status`` parses its own flags (a private
FlagValues, so it can run in-process next to other commands).
"""

from __future__ import annotations

import json
import sys

from absl import flags
from ml_collections import config_flags

from sparsejax.cli_common import one_line_errors, setup_logging

PROG = "sparsejax upcycle"


def _flags(argv: list[str]) -> flags.FlagValues:
  """The command's flags; ``--config.a.b`` overrides are defined from ``argv``."""
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "Target (MoE) config file and preset, e.g. "
                                  "configs/moe.py:tiny", flag_values=fv, lock_config=True,
                                  sys_argv=[PROG] + list(argv))
  flags.DEFINE_string("from", None, "Source run: WORKDIR or WORKDIR:STEP (default: its latest "
                      "committed step)", flag_values=fv)
  flags.DEFINE_string("out", None, "New run directory for the upcycled step-0 checkpoint",
                      flag_values=fv)
  flags.DEFINE_enum("mode", "copy", ["copy", "granular"], "copy: every expert is the dense FFN; "
                    "granular: experts are chunks of its hidden units", flag_values=fv)
  flags.DEFINE_float("noise", 0.0, "Relative noise added to every expert (x the RMS of each "
                     "dense weight); 0: exact copies", flag_values=fv)
  flags.DEFINE_enum("router_init", "auto", ["auto", "zero", "normal"], "auto: random when the "
                    "MoE is exact for any router, else zero", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Seed of the noise", flag_values=fv)
  flags.DEFINE_bool("allow_inexact", False, "Upcycle although the MoE will not equal the dense "
                    "model at step 0 (capacity dispatch that drops, expert choice, ...)",
                    flag_values=fv)
  return fv


def _parse(fv: flags.FlagValues, argv: list[str]) -> str | None:
  """None, or the one-line reason the flags are unusable."""
  try:
    rest = fv([PROG] + list(argv))
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    text = str(e.args[0]) if e.args else str(e)
    return " ".join(line.strip() for line in text.splitlines() if line.strip()) or type(e).__name__
  if len(rest) > 1:
    return f"unexpected arguments: {rest[1:]}"
  missing = [f"--{name}" for name in ("from", "config", "out") if fv[name].value is None]
  return f"{', '.join(missing)} required" if missing else None


def main(argv: list[str]) -> int:
  fv = _flags(argv)
  if any(a in ("-h", "--help", "--helpfull") for a in argv):
    print(f"{__doc__.strip()}\n\nflags:\n{fv.get_help()}")
    return 0
  error = _parse(fv, argv)
  if error:
    print(f"{PROG}: error: bad flag: {error}", file=sys.stderr)
    return 2
  setup_logging()
  with one_line_errors(PROG):
    # defers jax: bad flags answer without loading it, and jax.distributed is initialised
    # before anything can touch a device
    from sparsejax.parallel.distributed import initialize_from_env  # defers jax (see above)
    initialize_from_env()
    from sparsejax.configure import validate  # defers jax (see above)
    from sparsejax.upcycle.command import upcycle  # defers jax (see above)
    from sparsejax.upcycle.mapping import Options  # defers jax (see above)
    options = Options(mode=fv["mode"].value, noise=fv["noise"].value,
                      router_init=fv["router_init"].value, seed=fv["seed"].value,
                      allow_inexact=fv["allow_inexact"].value)
    summary = upcycle(fv["from"].value, validate(fv["config"].value), fv["out"].value, options)
    print(json.dumps({k: summary[k] for k in ("out", "source", "source_step", "params_source",
                                              "params_target", "continue")}))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
