"""mcl_jax: mutual contrastive learning and contrastive knowledge distillation in JAX/Flax."""

__version__ = '0.1.0'

# Before jax starts its runtime threads: host malloc that keeps XLA:CPU's per-step buffers mapped
# (CPU runs with glibc only; MCL_JAX_HOST_MALLOC=0 turns it off). See mcl_jax/host_memory.py.
from mcl_jax import host_memory as _host_memory  # pylint: disable=g-import-not-at-top

_host_memory.configure()
