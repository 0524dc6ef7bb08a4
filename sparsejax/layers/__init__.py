"""Layer families. Importing the package loads the registry first, which imports every family
(so a family module may import another family's module without an import cycle)."""

from sparsejax.layers import registry  # noqa: F401
