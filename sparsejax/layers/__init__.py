"""Layer families, one per file, each ending with its ``FAMILY`` record (family.py).
``sparsejax.layers.registry`` imports every family and maps config strings to records."""
