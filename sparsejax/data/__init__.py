"""Data pipeline: tokenizers, corpus preparation and token datasets.

Note: ``sparsejax.data.prepare`` names both a submodule and the re-exported
``prepare`` function; the package attribute is the function. Import module
members with ``from sparsejax.data.prepare import run`` (which always
resolves the submodule), not ``import sparsejax.data.prepare as m``.
"""

import warnings

# `python -m sparsejax.data.prepare` imports this package (and so the
# submodule) before running the submodule as __main__; the re-run is
# intended and harmless, so silence runpy's warning about it.
warnings.filterwarnings(
    "ignore", category=RuntimeWarning,
    message=r"'sparsejax\.data\.prepare' found in sys\.modules")

# pylint: disable=g-import-not-at-top,wrong-import-position
from sparsejax.data.tokenizers import (Tokenizer, get_tokenizer,
                                       tokenizer_from_spec)
from sparsejax.data.prepare import (default_dataset_dir,
                                    ensure_default_dataset, prepare)
from sparsejax.data.dataset import (TokenDataset, WindowSource,
                                    make_eval_batches, make_train_iterator,
                                    num_eval_batches, resolve_eval_data)

__all__ = [
    "Tokenizer", "get_tokenizer", "tokenizer_from_spec", "TokenDataset",
    "WindowSource", "num_eval_batches", "make_train_iterator", "make_eval_batches", "prepare",
    "ensure_default_dataset", "default_dataset_dir", "resolve_eval_data",
]
