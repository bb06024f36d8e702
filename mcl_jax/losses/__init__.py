"""Loss functions: pure, jit-able functions of arrays (``from mcl_jax import losses``)."""

from mcl_jax.losses.mcl import (
    ce_loss,
    icl_loss,
    l2_normalize,
    layer_match_weights,
    layer_mcl_loss,
    logit_kd_loss,
    mcl_loss,
    memory_update,
    memory_vcl_icl_losses,
    pair_mcl_terms,
    soft_icl_loss,
    soft_kl,
    soft_vcl_loss,
    supcon_from_logits,
    vcl_loss,
)
