"""The papers' losses as public pure functions (SPEC section 8).

Every function takes arrays, returns arrays, and is jit- and vmap-compatible.
"""

from mer_jax.losses.contrastive import (
    contrastive_categories,
    contrastive_loss,
    infonce,
    mcb_contrastive,
    supervised_contrastive,
)
from mer_jax.losses.distillation import (
    cafd,
    dkd,
    kd_regression_aux,
    mar_difficulty,
    mar_finalize,
    mar_init,
    mar_update,
    mar_weights,
    sugr,
)
from mer_jax.losses.task import task_loss
from mer_jax.losses.divergences import (
    anchor_loss,
    categorical_kl,
    class_anchor_update,
    cs_divergence_gaussian,
    cs_divergence_kernel,
    distribution_infonce,
    gaussian_kl_unit_variance,
    mipc_consistency,
    pairwise_wasserstein2,
    regression_anchor_class,
    symmetric_kl,
    udcl_loss,
)
from mer_jax.losses.uncertainty import gaussian_nll, vib_kl
