"""``sparsejax compile-check``: ahead-of-time compile of the real train step for TPU slices and
GPU nodes on a host without them (docs/compile_check.md).

  devices.py   the target's compile-only devices; the context that resolves layer choices for
               the target (parallel.hardware) and answers JAX's cuDNN checks on GPU targets
  program.py   build the trainer's step on the target mesh, lower, compile; memory, fits,
               FLOPs / roofline; --find_max_batch
  hlo.py       collectives per step from the optimised HLO (loop trip counts applied)
  __main__.py  the command (JSON on stdout; exit 0 fits, 2 does not fit, 1 error)
  fits*.py     the fits table (python -m sparsejax.compile_check.fits = make fits): fits_grid the
               rows x targets, fits_search the largest batch from few compiles, fits_report
               docs/fits.md from benchmarks/results/fits.json, fits the driver (cache, jobs)

The target table is sparsejax/parallel/targets.toml (parallel/targets.py).
"""
