"""``python -m sparsejax.sweep ...``: see sparsejax/sweep/cli.py. Sweep files'
``from sparsejax.sweep import Run`` resolves to sparsejax.sweep.planning.Run, the class ``plan``
checks against (this module runs as __main__ but defines nothing a sweep file imports)."""

import sys

from sparsejax.sweep.cli import main

if __name__ == "__main__":
  sys.exit(main())
