"""Sparse upcycling: a dense run's checkpoint -> the step-0 checkpoint of an MoE run.

    python -m sparsejax.upcycle --from WORKDIR[:STEP] --config configs/moe.py:<preset> \
        --out WORKDIR2 [--mode copy|granular] [--noise R] [--router_init auto|zero|normal]

``mapping`` holds the parameter mapping and when it is exact (its docstring), ``command`` the
function behind the command (``upcycle``), ``__main__`` the flags. Training continues with
``python -m sparsejax.train --config configs/workdir.py:WORKDIR2 --workdir WORKDIR2``.
"""
