"""Weight sparsity during training (issue 13): mask algebra (masks.py, dst.py), targets."""
