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
