"""ropd_jax: Rubric-based On-policy Distillation in JAX."""

__version__ = "0.1.0"
