"""Accelerator chips and compile targets, read from targets.toml (the one table of chip facts:
peak bf16 FLOP/s, HBM, ICI / DCN bandwidth, how to make the devices of a slice or node).

Target names (``sparsejax compile-check --target``):
  TPU  ``<chip>-<N>``: a slice of a TPU chip in targets.toml (v4, v5p, v5e, v6e) with N as Cloud
       TPU counts it (TensorCores for v4 / v5p: v5p-8 = 4 chips; chips for v5e / v6e);
       ``num_slices`` slices joined by DCN.
  GPU  ``<chip>x<G>[x<nodes>]``: nodes of G GPUs (h100x8, h200x8x4); nodes are the DCN granules.

Nothing here needs jax: parsing a name gives a ``Target`` (sizes, topology string, wrap flags,
the chip's numbers); compile_check turns it into devices.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
import re
import tomllib

TABLE = pathlib.Path(__file__).with_name("targets.toml")


@dataclasses.dataclass(frozen=True)
class Chip:
  """One [chips.<name>] table of targets.toml (units in its header)."""
  name: str
  platform: str                    # "tpu" | "gpu"
  device_kinds: tuple[str, ...]
  peak_bf16_tflops: float
  hbm_bytes: int
  source: str
  hbm_gbytes_per_s: float = 0.0
  ici_gbytes_per_s: float = 0.0
  dcn_gbits_per_s: float = 0.0
  # TPU compile targets
  topology_prefix: str = ""
  chip_config: str = ""
  cores_per_chip: int = 1
  chips_per_host_bounds: tuple[int, ...] = ()
  slices: tuple[dict, ...] = ()
  # GPU compile targets
  gpu_target_config: str = ""
  gpu_device_memory_bytes: int = 0
  gpu_memory_bandwidth: int = 0
  gpu_device_description: str = ""
  gpus_per_node: int = 0

  @property
  def compilable(self) -> bool:
    return bool(self.slices) if self.platform == "tpu" else bool(self.gpu_target_config)


@dataclasses.dataclass(frozen=True)
class Target:
  """A parsed target name: ``num_slices`` slices (TPU) or nodes (GPU) of ``chips_per_slice``."""
  name: str
  chip: Chip
  chips_per_slice: int
  num_slices: int
  topology: str                   # TPU: "4x4x8"; GPU: "slices x hosts x GPUs" = "1x4x8"
  wrap: tuple[bool, ...] = ()     # TPU: torus wrap-around per dimension

  @property
  def platform(self) -> str:
    return self.chip.platform

  @property
  def num_devices(self) -> int:
    return self.chips_per_slice * self.num_slices

  def summary(self) -> dict:
    """The target's facts for the compile-check JSON."""
    c = self.chip
    return {"name": self.name, "chip": c.name, "platform": c.platform,
            "devices": self.num_devices, "slices": self.num_slices,
            "chips_per_slice": self.chips_per_slice, "topology": self.topology,
            "hbm_bytes_per_device": c.hbm_bytes, "peak_bf16_tflops": c.peak_bf16_tflops,
            "hbm_gbytes_per_s": c.hbm_gbytes_per_s, "ici_gbytes_per_s": c.ici_gbytes_per_s,
            "dcn_gbits_per_s": c.dcn_gbits_per_s, "source": c.source}


@functools.cache
def chips() -> dict[str, Chip]:
  """Every chip of targets.toml by name."""
  table = tomllib.loads(TABLE.read_text())["chips"]
  out = {}
  for name, entry in table.items():
    entry = dict(entry)
    for key in ("device_kinds", "chips_per_host_bounds"):
      if key in entry:
        entry[key] = tuple(entry[key])
    entry["slices"] = tuple(entry.get("slices", ()))
    out[name] = Chip(name=name, **entry)
  return out


def peak_table() -> dict[str, float]:
  """device-kind substring -> peak dense bf16 TFLOP/s, for every chip."""
  return {kind: c.peak_bf16_tflops for c in chips().values() for kind in c.device_kinds}


def chip_for_kind(device_kind: str) -> Chip | None:
  """The chip whose longest device-kind substring occurs in ``device_kind`` (case-insensitive)."""
  kind = device_kind.lower()
  best = max(((len(k), c) for c in chips().values() for k in c.device_kinds if k in kind),
             key=lambda t: t[0], default=None)
  return None if best is None else best[1]


def names() -> list[str]:
  """Example target names, one per compilable chip (for help texts and errors)."""
  out = []
  for c in chips().values():
    if c.platform == "tpu" and c.slices:
      out.append(f"{c.name}-{c.slices[0]['chips'] * c.cores_per_chip}")
    elif c.compilable:
      out.append(f"{c.name}x{c.gpus_per_node}")
  return out


def parse(name: str, num_slices: int = 1) -> Target:
  """The Target of a name such as v5p-256, v5e-16, h100x8 or h200x8x4 (one-line ValueError)."""
  if num_slices < 1:
    raise ValueError(f"--num_slices: must be >= 1, got {num_slices}")
  known = ", ".join(names())
  tpu = re.fullmatch(r"([a-z0-9]+)-(\d+)", name.strip().lower())
  gpu = re.fullmatch(r"([a-z0-9]+?)x(\d+)(?:x(\d+))?", name.strip().lower())
  match = tpu or gpu
  chip = chips().get(match.group(1)) if match else None
  if chip is None or not chip.compilable:
    raise ValueError(f"--target: {name!r} is not a known target; use <tpu>-<N> or "
                     f"<gpu>x<gpus>[x<nodes>], e.g. {known}")
  if chip.platform == "tpu":
    if not tpu:
      raise ValueError(f"--target: {chip.name} is a TPU: name a slice as {chip.name}-<N>")
    return _tpu_target(name, chip, int(tpu.group(2)), num_slices)
  if not gpu:
    raise ValueError(f"--target: {chip.name} is a GPU: name nodes as {chip.name}x<gpus>"
                     "[x<nodes>]")
  if num_slices != 1:
    raise ValueError(f"--num_slices: GPU nodes are given in the target name "
                     f"({chip.name}x{chip.gpus_per_node}x<nodes>), not by --num_slices")
  gpus, nodes = int(gpu.group(2)), int(gpu.group(3) or 1)
  if not 1 <= gpus <= chip.gpus_per_node or nodes < 1:
    raise ValueError(f"--target: {name!r} needs 1..{chip.gpus_per_node} GPUs per node and "
                     ">= 1 nodes")
  return Target(name, chip, chips_per_slice=gpus * nodes, num_slices=1,
                topology=f"1x{nodes}x{gpus}")


def _tpu_target(name: str, chip: Chip, n: int, num_slices: int) -> Target:
  if n % chip.cores_per_chip:
    raise ValueError(f"--target: {name!r}: {chip.name}-N counts TensorCores, "
                     f"{chip.cores_per_chip} per chip; N must be a multiple of it")
  want = n // chip.cores_per_chip
  for s in chip.slices:
    if s["chips"] == want:
      dims = s["topology"].split("x")
      if math.prod(int(d) for d in dims) != want:
        raise ValueError(f"targets.toml: {chip.name} slice {s['topology']} is not "
                         f"{want} chips")
      return Target(name, chip, chips_per_slice=want, num_slices=num_slices,
                    topology=s["topology"], wrap=tuple(bool(w) for w in s["wrap"]))
  sizes = ", ".join(f"{chip.name}-{s['chips'] * chip.cores_per_chip}" for s in chip.slices)
  raise ValueError(f"--target: {name!r} is not a {chip.name} slice in targets.toml; "
                   f"choose one of {sizes}")
