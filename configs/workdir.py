r"""A run's own config: ``--config configs/workdir.py:RUN_DIR`` reads RUN_DIR/config.json.

Continue a converted or upcycled run (its step-0 checkpoint is already there), or fine-tune from
one with other settings:

    python -m sparsejax.train --config configs/workdir.py:runs/up --workdir runs/up
    python -m sparsejax.train --config configs/workdir.py:runs/hf --workdir runs/ft \
        --config.train.init_from=runs/hf --config.train.steps=200

``--config.a.b=v`` overrides apply on top, as with any config file.
"""

import json
import pathlib

import ml_collections


def get_config(run_dir: str = "") -> ml_collections.ConfigDict:
  if not run_dir:
    raise ValueError("configs/workdir.py needs a run directory: --config configs/workdir.py:RUN_DIR")
  path = pathlib.Path(run_dir) / "config.json"
  if not path.is_file():
    raise FileNotFoundError(f"{path} does not exist: RUN_DIR must be a sparsejax run directory "
                            "(one written by train, upcycle or convert)")
  raw = json.loads(path.read_text())
  return ml_collections.ConfigDict(_tuples(raw))


def _tuples(node):
  """JSON lists back to the tuples the schema uses (ConfigDict keeps lists as lists)."""
  if isinstance(node, dict):
    return {k: _tuples(v) for k, v in node.items()}
  if isinstance(node, list):
    return tuple(_tuples(v) for v in node)
  return node
