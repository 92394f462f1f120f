r"""CM-ARR (cross-modal alignment, reconstruction and refinement) on MSP-IMPROV, 4 emotions.

    python -m mer_jax.train --config configs/cmarr_msp_improv.py:synthetic --workdir /tmp/cmarr
    python -m mer_jax.crossval --config configs/cmarr_msp_improv.py --workdir /tmp/cmarr_cv \
        --config.data.dir=/path/to/features

Variants: `:synthetic` (embedded MSP-IMPROV-shaped data, no download, a few minutes on a
CPU), `:tiny` (seconds, for tests); none = the real features in `--config.data.dir`
with the paper's hyper-parameters (cm_arr.txt Sec. 4.2). `config.data.fold` selects one
of the `config.data.num_folds` leave-one-session-out folds; `mer_jax.crossval` runs all
of them (on synthetic data a fold only changes the data seed).
"""

from mer_jax import config_lib


def get_config(arg=None):
  variant = config_lib.parse_variant(arg)
  config = config_lib.base_config()
  config.method = "cmarr"

  # Data: MMIN-format MSP-IMPROV (BERT-base text, wav2vec2-base speech, Denseface 342
  # video), 4 classes (Table 1), 6-fold leave-one-session-out.
  config.data.source = "mmin"
  config.data.name = "msp_improv"
  config.data.task = "classification"
  config.data.num_folds = 6

  # Model. The paper gives no widths; these are the usual sizes for these features.
  config.model.width = 128  # common width D of the Conv1D projections, flows and fusion
  config.model.common_length = 0  # 0 = the longest modality (unaligned data are pooled)
  config.model.kernel_sizes = (3, 1, 1)  # Conv1D per modality (L, A, V), SPEC section 7
  config.model.umc_dim = 128  # width of the UMC Gaussians
  config.model.umc_heads = 8
  config.model.umc_mlp_dim = 256
  config.model.flow_layers = 4  # affine couplings per modality
  config.model.flow_hidden = 256
  config.model.flow_scale = 2.0  # per-layer bound on the coupling log-scale
  config.model.rcab_blocks = 3
  config.model.rcab_features = 128
  config.model.rcab_kernel = 3
  config.model.rcab_reduction = 16
  config.model.fusion_layers = 1  # Eq. 13: one self-attention block
  config.model.fusion_heads = 8
  config.model.fusion_mlp_dim = 256
  config.model.dropout = 0.1
  config.model.head_hidden = 128
  # L_udcl similarity S = a * D_2W + b, logits S / tau (Eq. 3-5): initial |a| and tau.
  # D_2W sums over the umc_dim dimensions, so tau starts at umc_dim (0 = that): the first
  # logits are minus the mean squared difference per dimension, near chance, instead of
  # a loss in the hundreds that would swamp every other term.
  config.model.udcl_init_scale = 1.0
  config.model.udcl_init_temperature = 0.0

  # Losses (Eq. 14): L = alpha L_udcl + beta L_spcl + lambda L_rec + L_cls
  # + lambda_flow L_flow; alpha = 1, beta = 0.1, lambda = 10 (Sec. 4.2).
  config.loss.udcl_weight = 1.0  # alpha; 0 = the "w/o L_udcl" ablation
  config.loss.spcl_weight = 0.1  # beta; 0 = the "w/o L_spcl" ablation
  config.loss.rec_weight = 10.0  # lambda
  config.loss.flow_weight = 0.1  # lambda_flow: flow NLL per dimension (DiCMoR)
  config.loss.udcl_kind = "distribution"  # "point" = the "w/ Point" ablation
  config.loss.spcl_temperature = 0.1  # SupCon temperature (Khosla et al.)
  config.loss.rec_stop_gradient = True  # reconstruction targets do not move the projections
  config.loss.regression_loss = "l1"  # only used if data.task = "regression"

  # Optimiser (Sec. 4.2): learning rate 1e-5, batch size 16, 100 epochs.
  config.train.optimizer = "adam"
  config.train.learning_rate = 1e-5
  config.train.weight_decay = 0.0
  config.train.batch_size = 16
  config.train.num_epochs = 100
  config.train.schedule = "constant"

  # Training protocol: every sample sees one of the 6 incomplete combinations,
  # uniformly (the MMIN protocol CM-ARR is compared under); full inputs are not drawn.
  config.missing.kind = "drop"
  config.missing.probs = (1 / 6,) * 6 + (0.0,)

  if variant == "synthetic":
    config.data.source = "synthetic"
    config.model.width = 32
    config.model.umc_dim = 32
    config.model.umc_heads = 4
    config.model.umc_mlp_dim = 64
    config.model.flow_layers = 2
    config.model.flow_hidden = 64
    config.model.rcab_blocks = 1
    config.model.rcab_features = 32
    config.model.rcab_reduction = 4
    config.model.fusion_heads = 4
    config.model.fusion_mlp_dim = 64
    config.model.head_hidden = 32
    config.train.optimizer = "adamw"
    config.train.weight_decay = 1e-4
    config.train.learning_rate = 1e-3
    config.train.batch_size = 32
    config.train.num_epochs = 10
    config.train.schedule = "cosine"
    # The paper reports only the 7 fixed combinations; MR curves stay as a cheap extra.
    config.eval.frame_rates = ()
  config_lib.apply_variant(config, variant)
  if variant == "tiny":
    config.model.width = 16
    config.model.umc_dim = 8
    config.model.umc_heads = 2
    config.model.umc_mlp_dim = 16
    config.model.flow_layers = 2
    config.model.flow_hidden = 16
    config.model.rcab_blocks = 1
    config.model.rcab_features = 16
    config.model.rcab_reduction = 4
    config.model.fusion_heads = 2
    config.model.fusion_mlp_dim = 32
    config.model.head_hidden = 16
    config.train.learning_rate = 1e-3
    config.data.num_folds = 2
  return config_lib.finalize(config)
