"""Evaluation: ``core`` (eval step, metrics, evaluate_params over batches) and ``checkpoint``
(``evaluate(workdir, step=None, data=None)``: a saved run's checkpoint on any device count);
``python -m sparsejax.eval`` is the CLI."""
