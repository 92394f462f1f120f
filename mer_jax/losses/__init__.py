"""The papers' losses as public pure functions (SPEC section 8).

Every function takes arrays, returns arrays, and is jit- and vmap-compatible.
"""

from mer_jax.losses.contrastive import (
    contrastive_categories,
    contrastive_loss,
    cross_modal_supervised_contrastive,
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
from mer_jax.losses.task import task_loss
from mer_jax.losses.uncertainty import gaussian_nll, vib_kl

__all__ = [
    "anchor_loss",
    "cafd",
    "categorical_kl",
    "class_anchor_update",
    "contrastive_categories",
    "contrastive_loss",
    "cross_modal_supervised_contrastive",
    "cs_divergence_gaussian",
    "cs_divergence_kernel",
    "distribution_infonce",
    "dkd",
    "gaussian_kl_unit_variance",
    "gaussian_nll",
    "infonce",
    "kd_regression_aux",
    "mar_difficulty",
    "mar_finalize",
    "mar_init",
    "mar_update",
    "mar_weights",
    "mcb_contrastive",
    "mipc_consistency",
    "pairwise_wasserstein2",
    "regression_anchor_class",
    "sugr",
    "supervised_contrastive",
    "symmetric_kl",
    "task_loss",
    "udcl_loss",
    "vib_kl",
]
