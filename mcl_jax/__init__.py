"""mcl_jax: mutual contrastive learning and contrastive knowledge distillation in JAX/Flax."""

__version__ = '0.1.0'
