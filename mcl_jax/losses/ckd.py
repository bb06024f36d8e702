"""CKD: contrastive knowledge distillation from a sample-wise perspective (Zhu et al., arXiv
2404.14109; ``docs/methods.md#ckd``). ``B`` batch, ``C`` classes."""

import jax
import jax.numpy as jnp

from mcl_jax.losses.mcl import _upcast, l2_normalize

Array = jax.Array


def ckd_loss(student_logits, teacher_logits, temperature: float = 1.0) -> Array:
  """Sample-wise logit InfoNCE: teacher row i against every student row j, positive j = i.

  ``t = nrm(sg(z_t))``, ``s = nrm(z_s)`` (rows, eps 1e-12), ``S = t s^T / temperature``,
  loss ``= mean_i(logsumexp_j S[i, j] - S[i, i])``. In-batch negatives, no labels.

  Args:
    student_logits: ``[B, C]``.
    teacher_logits: ``[B, C]`` (stop-gradient inside).
    temperature: ``tau``.

  Returns:
    Scalar.
  """
  t = l2_normalize(jax.lax.stop_gradient(_upcast(teacher_logits)))
  s = l2_normalize(_upcast(student_logits))
  sim = t @ s.T / temperature
  return jnp.mean(jax.nn.logsumexp(sim, axis=-1) - jnp.diagonal(sim))
