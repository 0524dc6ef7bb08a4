"""Standalone Pallas kernels (kernel + pure-jnp reference + custom_vjp wrapper + dispatch), importable with jax and numpy alone."""
