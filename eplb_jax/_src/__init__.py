"""The implementation of eplb_jax; the public surface is :mod:`eplb_jax` and its subpackages."""
