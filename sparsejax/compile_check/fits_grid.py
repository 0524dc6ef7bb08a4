"""What the fits table compiles (sparsejax/compile_check/fits.py): the rows (a config preset, its
mesh preset, --config overrides), the targets, the per-device batch cap. Edit the data here:
``COMMON_OVERRIDES`` applies to every cell (e.g. scanned layers once they exist), a row's
``overrides`` to its own cells.

Meshes: ``fsdp`` for dense, memory and PEER; ``fsdp_ep`` for MoE (expert = 4 devices, inside
a v5p host or an H100 node; every MoE preset's expert count divides by 4, and the logical mesh
maps onto the v5p-256 (4x4x8) and v5e-256 (16x16) tori).
The memory value pool and the PEER expert tables keep every row on every device (family rules:
rows -> no mesh axis, columns -> tensor), so under plain fsdp a PEER preset's state (27.5B+
parameters) fits no target. The "+experts_fsdp" / "+values_fsdp" rows shard those tables'
columns over fsdp instead. Measured on the tiny presets (v5p-8): PEER then compiles without
gathering its tables; the memory step all-gathers the whole value pool once per step, so its
paper-size rows are expected to run out of memory until the lookup is sharded.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import pathlib

TARGETS = ("v5p-8", "v5p-256", "v5e-256", "h100x8")
CAP = 64  # sequences per device: the search stops there (the table says "capped")
# Overrides for every cell, e.g. (("model.scan_layers", True),) once scanned layers exist.
COMMON_OVERRIDES: tuple[tuple[str, object], ...] = ()
_VALUES_FSDP = (("mesh.rules", (("mem_dim", "fsdp"),)),)  # value-pool columns over fsdp
_EXPERTS_FSDP = (("mesh.rules", (("peer_dim", "fsdp"),)),)  # PEER table columns over fsdp


@dataclasses.dataclass(frozen=True)
class Row:
  """A config preset with its mesh preset and --config overrides; ``variant`` names a second
  row of the same preset. ``targets``: where it is compiled."""
  config: str
  mesh: str
  overrides: tuple[tuple[str, object], ...] = ()
  variant: str = ""
  targets: tuple[str, ...] = TARGETS

  @property
  def id(self) -> str:
    """"dense:1.3b" (config file stem : preset), "+variant" for a variant."""
    path, _, preset = self.config.partition(":")
    return f"{pathlib.Path(path).stem}:{preset}" + (f"+{self.variant}" if self.variant else "")


def _rows(config: str, presets: str, mesh: str, **kw) -> list[Row]:
  return [Row(f"{config}:{p}", mesh, **kw) for p in presets.split()]


ROWS: tuple[Row, ...] = (
    *_rows("configs/dense.py", "125m 350m 760m 1.3b 8b 70b", "fsdp"),
    *_rows("configs/moe.py", "125m 350m qwen_moe_a2.7b mixtral_8x7b", "fsdp_ep"),
    *_rows("configs/memory.py", "125m 350m 760m 1.3b 8b 1.3b_64m", "fsdp"),
    *_rows("configs/memory.py", "8b 1.3b_64m", "fsdp", overrides=_VALUES_FSDP,
           variant="values_fsdp"),
    *_rows("configs/peer.py", "125m 350m 760m", "fsdp"),
    *_rows("configs/peer.py", "125m 350m 760m", "fsdp", overrides=_EXPERTS_FSDP,
           variant="experts_fsdp"),
)


def cli_value(value) -> str:
  """A --config override's value as the command line takes it (tuples as Python literals)."""
  return repr(value) if isinstance(value, tuple) else str(value)


@dataclasses.dataclass(frozen=True)
class Cell:
  """One row on one target."""
  row: Row
  target: str

  @property
  def overrides(self) -> tuple[tuple[str, object], ...]:
    return (("mesh.preset", self.row.mesh), *COMMON_OVERRIDES, *self.row.overrides)

  def key(self, versions: dict, cap: int, config_digest: str = "") -> str:
    """The cache key: a preset edited since (``config_digest`` of the resolved config) or new
    compiler versions make a new cell instead of reusing old compiles."""
    return json.dumps([self.row.id, self.target, [[k, cli_value(v)] for k, v in self.overrides],
                       versions, cap] + ([config_digest] if config_digest else []))


def command(cell: Cell, global_batch: int) -> list[str]:
  """The compile-check arguments of one compile of ``cell``."""
  return ["-m", "sparsejax.compile_check", "--config", cell.row.config, "--target", cell.target,
          f"--global_batch={global_batch}",
          *[f"--config.{k}={cli_value(v)}" for k, v in cell.overrides]]


def select(only: list[str]) -> list[Cell]:
  """The grid's cells whose "<row id>/<target>" matches one of the glob patterns (a pattern
  without "/" matches every target); all cells without patterns."""
  pats = [p if "/" in p else f"{p}/*" for p in only]
  return [Cell(row, t) for row in ROWS for t in row.targets
          if not pats or any(fnmatch.fnmatchcase(f"{row.id}/{t}", p) for p in pats)]
