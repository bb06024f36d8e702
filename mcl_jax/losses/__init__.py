"""Loss functions: pure, jit-able functions of arrays (``from mcl_jax import losses``)."""

from mcl_jax.losses.mcl import (
    ce_loss,
    icl_loss,
    l2_normalize,
    layer_match_weights,
    layer_mcl_loss,
    logit_kd_loss,
    mcl_loss,
    memory_layer_mcl_loss,
    memory_update,
    memory_vcl_icl_losses,
    pair_mcl_terms,
    soft_icl_loss,
    soft_kl,
    soft_vcl_loss,
    supcon_from_logits,
    vcl_loss,
)
from mcl_jax.losses.moco import (
    moco_enqueue,
    moco_logits,
    moco_mcl_loss,
    moco_mcl_terms,
    moco_pretext_top1,
)
from mcl_jax.losses.nce import nce_loss, nce_memory_update, nce_scores
from mcl_jax.losses.okd import dot_loss, mcl_okd_contrastive_loss
from mcl_jax.losses.ckd import ckd_loss
from mcl_jax.losses.crcd import crcd_relation_loss, crcd_relation_scores, linear_ce_feature_grad
