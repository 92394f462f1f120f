r"""EASE (uncertainty-calibrated elastic alignment) on CH-SIMS sentiment regression.

    python -m mer_jax.train --config configs/ease_sims.py:synthetic --workdir /tmp/ease_sims

Variants: `:synthetic` (embedded SIMS-shaped data, no download, a few CPU minutes),
`:tiny` (seconds, for tests); none = the real MMSA `unaligned_39.pkl` in `--config.data.dir`
with the paper's hyper-parameters (ease.txt A.3). `ease_mosi.py` and `ease_mosei.py` differ
only in the data fields.
"""

from mer_jax import config_lib

# EASE evaluation (ease.txt Sec. 4.3, A.3): frame-level missing at r = 0, 0.1, ..., 0.9 on
# every modality at once, averaged, and the six fixed incomplete subsets (plus full).
EASE_FRAME_RATES = tuple(round(0.1 * i, 1) for i in range(10))


def get_config(arg=None):
  variant = config_lib.parse_variant(arg)
  config = config_lib.base_config()
  config.method = "ease"

  # Data: MMSA SIMS, unaligned (BERT-Chinese 768 x 39, LibROSA 33 x 400, OpenFace 709 x 55),
  # labels in [-1, 1] (the anchors stretch them to the same 7 classes).
  config.data.source = "mmsa"
  config.data.name = "sims"
  config.data.task = "regression"

  # Model. The paper's backbone is a transformer per modality (Sec. 3.2) without sizes;
  # these fit precomputed features (BERT 768 / COVAREP / Facet) at LNLN's scale.
  config.model.width = 128
  config.model.num_layers = 2
  config.model.num_heads = 4
  config.model.mlp_dim = 256
  config.model.dropout = 0.1
  config.model.kernel_sizes = (3, 1, 1)  # Conv1D per modality (L, A, V), SPEC section 7
  config.model.ucmi_hidden = 128  # hidden layer of the UCMI heads F_mu / F_sigma
  config.model.fusion_layers = 1  # transformer layers over the three completed features
  config.model.head_hidden = 64
  config.model.use_ucmi = True  # False: "w/o UCMI" (no completion, no L_ucmi/L_align)

  # Losses (Eq. 13, A.3): L = task + l1 L_ucmi + l2 (L_uada + b1 L_anchor) + l3 L_consist.
  # The *_weight switches give the Table 4 loss ablations (0 removes a term).
  config.loss.regression_loss = "l1"  # MMSA/LNLN regression objective
  config.loss.lambda_ucmi = 0.5
  config.loss.lambda_align = 0.2
  config.loss.lambda_consist = 0.5
  config.loss.beta_anchor = 0.02
  config.loss.uada_weight = 1.0
  config.loss.cons_weight = 1.0
  config.loss.asym_weight = 1.0
  # Kernel bandwidth tau = uada_tau_scale * sqrt(D) (the paper gives no value; squared
  # distances of D-dimensional features grow with D) and psi = 1 + alpha * mean(u).
  config.loss.uada_tau_scale = 0.5
  config.loss.uada_alpha = 1.0
  # The variance is learned by L_ucmi alone and only read by the kernel bandwidth.
  config.loss.uada_stop_uncertainty_grad = True
  config.loss.anchor_momentum = 0.9  # EMA weight of the old anchor (B.2: "moving average")

  # Optimiser (A.3): Adam, fixed learning rate 1e-5, batch 64, 200 epochs.
  config.train.optimizer = "adam"
  config.train.learning_rate = 1e-5
  config.train.weight_decay = 0.0
  config.train.batch_size = 64
  config.train.num_epochs = 200
  config.train.schedule = "constant"

  # Training protocol: LNLN frame-level missing (per sample and modality r ~ U(0, 1), r = 0
  # for a random half) in both partial views, each also keeping a per-sample modality
  # subset drawn uniformly from the 7 combinations; the full view is the clean batch.
  config.missing.kind = "frame_lnln"
  config.missing.probs = (1 / 7,) * 7

  config.eval.fixed = True
  config.eval.missing_rates = ()
  config.eval.frame_rates = EASE_FRAME_RATES
  config.eval.frame_sets = ("LAV",)

  if variant == "synthetic":
    # A few CPU minutes: a smaller network and AdamW at a from-scratch learning rate.
    config.model.width = 32
    config.model.num_layers = 1
    config.model.num_heads = 2
    config.model.mlp_dim = 64
    config.model.ucmi_hidden = 32
    config.model.head_hidden = 32
    config.train.optimizer = "adamw"
    config.train.learning_rate = 1e-3
    config.train.weight_decay = 1e-4
    config.train.num_epochs = 6
    config.train.log_every_steps = 4
  config_lib.apply_variant(config, variant)
  if variant == "tiny":
    config.model.width = 16
    config.model.num_layers = 1
    config.model.num_heads = 2
    config.model.mlp_dim = 32
    config.model.ucmi_hidden = 16
    config.model.head_hidden = 16
    config.train.optimizer = "adamw"
    config.train.learning_rate = 1e-3
    config.eval.missing_rates = ()
    config.eval.frame_rates = (0.0, 0.5, 0.9)
    config.eval.frame_sets = ("LAV",)
  return config_lib.finalize(config)

