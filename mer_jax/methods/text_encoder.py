"""A fine-tuned BERT text branch for every method (`config.model.text_encoder = "bert"`).

`with_text_encoder(stage, ...)` turns any method's `Stage` into one whose params are
`{"text_encoder": BERT params, "method": the method's params}` and whose text features
are BERT's hidden states (B, T, H) of the token ids the data carry (`text_ids`,
`text_segments`; MMSA `text_bert`). No method file has a BERT branch: the method's
network sees `text` of width H (its text Conv1D input width follows the encoder).

When the encoder runs. Text is encoded *after* the missing-modality protocol, inside
the method's forward, so that a dropped word is hidden from BERT itself (encoding first
and masking the hidden states would leak the dropped words into their neighbours'
contextual states). The frame-level protocols record the text positions they drop in
`text_dropped` (`data.missing.apply_frame_masking`; with `flag_dropped_frames` they are
also flagged in `text_mask`); the encoder then reads, per LNLN (the EASE protocol):

  input ids   = the tokens, with every real token that the protocol dropped replaced by
                the vocabulary's [UNK], except [CLS] and [SEP], which are always kept;
  attention   = the original attention mask (real tokens, [UNK]s included);
  text        = hidden states on the positions `text_mask` keeps, zeros elsewhere: by
                default every real token, so the model sees the [UNK] states as LNLN
                does; absent text (and flagged drops) are zero.

The original attention mask is `text_ids != [PAD]` (the MMSA reader pads ids with 0). For the
deterministic forward (`Stage.predict`, used by validation, evaluation and prediction)
the stage's model is `TextEncoderModel`, which encodes and then calls the method's
network. In training, the method's loss applies its own network to the batches its
protocol made; the wrapper's loss runs it under a flax method interceptor that encodes
any batch given to a module method that still carries `text_ids` (the encoded batch has
none, so nested calls pass through). The encoder's dropout draws from the
module's own "dropout" stream.

Teachers (MCUR, CMAD students). The frozen teacher runs on the clean batch: the wrapper
encodes it once with the teacher's frozen encoder into `teacher_text`, and the method
reads `teacher_inputs(batch)` for the teacher forward.

Initial weights come from `config.model.text_encoder_path` (a local Hugging Face
folder), read by a host callback when the params are initialised: never embedded in the
compiled program, and not read by shape-only initialisations (restoring a checkpoint).
The folder is checked (config, every tensor name and shape, from the headers) when the
stages are built, so a wrong folder fails before anything compiles.

Noise (`missing.kind = "noise"`, eval `noise_intensities`) perturbs feature arrays; the
text branch encodes ids, so noise reaches audio and vision only.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from mer_jax.data.missing import DROPPED_TEXT
from mer_jax.data.spec import DataSpec
from mer_jax.methods.base import Stage, StageContext
from mer_jax.nn import bert

TEXT_ENCODERS = ("features", "bert")
TOKEN_KEYS = ("text_ids", "text_segments")
TEACHER_TEXT = "teacher_text"


def masked_token_ids(text_ids, text_mask, tokens: bert.SpecialTokens, text_dropped=None):
  """BERT inputs after a missing protocol, as LNLN builds them.

  Args:
    text_ids: (B, T) int token ids, [PAD] on padding.
    text_mask: (B, T) bool, the protocol's frame mask (False on padding, absent text and
      tokens dropped with `flag_dropped_frames`).
    tokens: the special token ids.
    text_dropped: (B, T) bool, the tokens a frame-level protocol dropped (None: none).

  Returns:
    (input_ids (B, T) int32 with dropped real tokens -> [UNK] except [CLS]/[SEP],
     attention (B, T) bool = the real tokens, dropped ones included).
  """
  ids = jnp.asarray(text_ids, jnp.int32)
  attention = ids != tokens.pad
  special = (ids == tokens.cls) | (ids == tokens.sep)
  hidden = ~jnp.asarray(text_mask, bool)
  if text_dropped is not None:
    hidden = hidden | jnp.asarray(text_dropped, bool)
  dropped = attention & hidden & ~special
  return jnp.where(dropped, tokens.unk, ids), attention


def encode_text(encoder: bert.BertModel, params, batch: Mapping, tokens: bert.SpecialTokens, *,
                train: bool, rng=None) -> dict:
  """The batch with `text` = BERT hidden states (B, T, H) of its token ids.

  Args:
    encoder: the `BertModel` (without pooler).
    params: its params.
    batch: a batch in the layout of SPEC section 4 plus `text_ids` (and optionally
      `text_segments`) (B, T) int.
    tokens: special token ids.
    train: dropout on (needs `rng`).
    rng: dropout key.

  Returns:
    A new dict without the token keys; `text` is zero where `text_mask` is False.
  """
  ids, attention = masked_token_ids(batch["text_ids"], batch["text_mask"], tokens,
                                   batch.get(DROPPED_TEXT))
  segments = batch.get("text_segments")
  rngs = {"dropout": rng} if train and rng is not None else {}
  hidden = encoder.apply({"params": params}, ids, attention, segments,
                         train=train and rng is not None, rngs=rngs)["hidden"]
  keep = jnp.asarray(batch["text_mask"], bool)[..., None]
  out = {k: v for k, v in batch.items() if k not in TOKEN_KEYS and k != DROPPED_TEXT}
  out["text"] = jnp.where(keep, hidden, jnp.zeros((), hidden.dtype))
  return out


def teacher_inputs(batch: Mapping) -> Mapping:
  """The batch a frozen teacher reads: with a BERT text branch, `text` is the teacher's own
  encoding of the clean tokens (`teacher_text`, set by the wrapper); otherwise `batch`."""
  if TEACHER_TEXT not in batch:
    return batch
  out = {k: v for k, v in batch.items()
         if k not in TOKEN_KEYS and k not in (TEACHER_TEXT, DROPPED_TEXT)}
  out["text"] = batch[TEACHER_TEXT]
  return out


def frozen_teacher_forward(teacher_model: nn.Module) -> Callable:
  """`Stage.teacher_forward` of a teacher/student method: the frozen teacher in evaluation
  mode on the clean batch (`teacher_inputs`), its `output` and `embedding`."""

  def forward(frozen, batch):
    out = teacher_model.apply({"params": frozen}, teacher_inputs(batch), train=False)
    return {"output": out["output"], "embedding": out["embedding"]}

  return forward


def _pretrained_init(path: str, encoder: bert.BertModel) -> Callable:
  """Param initialiser of the encoder: the folder's weights via a host callback (random
  BERT initialisation without a folder)."""

  def init(key, *_):
    ids = jnp.zeros((1, 1), jnp.int32)
    random_init = lambda: encoder.init(key, ids, ids > 0)["params"]
    if not path:
      return random_init()
    shapes = jax.eval_shape(random_init)
    load = functools.partial(bert.load_params, path, encoder.config,
                             use_pooler=encoder.use_pooler, scan=encoder.scan)
    return jax.pure_callback(load, shapes)

  return init


class TextEncoderModel(nn.Module):
  """BERT text branch + a method's network: `apply(batch, train)` encodes `text_ids` into
  `text` (see the module docstring) and returns what the method's network returns.

  Params: `{"text_encoder": BertModel params, "method": the method's params}`.
  """

  encoder: bert.BertModel
  method: nn.Module
  tokens: bert.SpecialTokens = bert.SpecialTokens()
  pretrained: str = ""  # checkpoint folder of the initial weights ("" = random)

  @nn.compact
  def __call__(self, batch, *, train: bool, **method_kwargs):
    """`method_kwargs` go to the method's network (`scenario_modality_mask=` of a
    `Stage.masks_in_network` network: the text is then encoded once for every mask)."""
    if "text_ids" not in batch:
      raise ValueError("config.model.text_encoder='bert' reads token ids: the batch has no "
                       f"'text_ids' (keys {sorted(batch)}); only MMSA data (text_bert) "
                       "carry them")
    params = self.param("text_encoder", _pretrained_init(self.pretrained, self.encoder))
    rng = self.make_rng("dropout") if train and self.has_rng("dropout") else None
    batch = encode_text(self.encoder, params, batch, self.tokens, train=train, rng=rng)
    return self.method(batch, train=train, **method_kwargs)


def with_text_encoder(stage: Stage, encoder: bert.BertModel, tokens: bert.SpecialTokens, *,
                      pretrained: str = "") -> Stage:
  """`stage` with a BERT text branch (see the module docstring).

  Args:
    stage: a method's stage built for text features of width `encoder.config.hidden_size`.
    encoder: the `BertModel` (use_pooler=False).
    tokens: special token ids of its vocabulary.
    pretrained: folder of the initial encoder weights ("" = random initialisation).
  """
  model = TextEncoderModel(encoder=encoder, method=stage.model, tokens=tokens,
                           pretrained=pretrained)

  def loss_fn(params, method_state, batch, key, context: StageContext):
    frozen = context.frozen
    if isinstance(frozen, Mapping) and "text_encoder" in frozen:
      # A frozen teacher: its own encoder on the clean tokens, no gradient (not needed
      # when the trainer computed the teacher's outputs for the split).
      if context.teacher_outputs is None:
        teacher = encode_text(encoder, frozen["text_encoder"], batch, tokens, train=False)
        batch = dict(batch, **{TEACHER_TEXT: jax.lax.stop_gradient(teacher["text"])})
      context = dataclasses.replace(context, frozen=frozen["method"])

    def interceptor(next_fun, args, kwargs, call):
      if args and isinstance(args[0], Mapping) and "text_ids" in args[0]:
        train = bool(kwargs.get("train", False))
        module = call.module
        rng = module.make_rng("dropout") if train and module.has_rng("dropout") else None
        args = (encode_text(encoder, params["text_encoder"], args[0], tokens, train=train,
                            rng=rng), *args[1:])
      return next_fun(*args, **kwargs)

    # The file's text features are never the method's input here: a zero-width stand-in
    # keeps the protocols' array code unchanged (and cheap), and a network that read it
    # without encoding would fail on the width instead of silently training on it.
    batch = dict(batch, text=jnp.zeros(jnp.shape(batch["text"])[:2] + (0,), jnp.float32))
    with nn.intercept_methods(interceptor):
      return stage.loss_fn(params["method"], method_state, batch, key, context)

  teacher_forward = None
  if stage.teacher_forward is not None:
    def teacher_forward(frozen, batch):
      teacher = encode_text(encoder, frozen["text_encoder"], batch, tokens, train=False)
      return stage.teacher_forward(frozen["method"],
                                   dict(batch, **{TEACHER_TEXT: teacher["text"]}))

  return dataclasses.replace(stage, model=model, loss_fn=loss_fn,
                             teacher_forward=teacher_forward)


def encoder_from_config(model_config) -> tuple[bert.BertModel, bert.SpecialTokens]:
  """The `BertModel` and special tokens of `config.model.text_encoder_path`, after checking
  that the folder's weights fill the encoder (names and shapes, from the headers).

  Raises:
    FileNotFoundError / ValueError: naming the folder, file and tensor at fault.
  """
  path = model_config.text_encoder_path
  if not path:
    raise ValueError("config.model.text_encoder='bert' needs config.model.text_encoder_path, "
                     "a local BERT folder (config.json + model.safetensors); see docs/methods.md")
  config = bert.load_config(path)
  bert.check_checkpoint(path, config, use_pooler=False)
  encoder = bert.BertModel(config, use_pooler=False,
                           remat=bool(model_config.get("text_encoder_remat", False)))
  return encoder, bert.load_special_tokens(path, config)


def build_with_text_encoder(build: Callable, config, spec: DataSpec) -> list[Stage]:
  """`build(config, spec)` (a method's stage builder) with a BERT text branch on every
  stage; the method is built for text of the encoder's width."""
  encoder, tokens = encoder_from_config(config.model)
  text_spec = dataclasses.replace(spec, dims=(encoder.config.hidden_size, *spec.dims[1:]))
  return [with_text_encoder(stage, encoder, tokens, pretrained=config.model.text_encoder_path)
          for stage in build(config, text_spec)]


def parameter_counts(params) -> dict[str, int]:
  """Parameter counts of a stage's params (arrays or `jax.eval_shape` shapes): `num_params`,
  `num_params_text_encoder` (the BERT branch; 0 without one) and
  `num_params_without_text_encoder`."""
  count = lambda tree: int(sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree)))
  total = count(params)
  text = count(params["text_encoder"]) if isinstance(params, Mapping) and (
      "text_encoder" in params) else 0
  return {"num_params": total, "num_params_text_encoder": text,
          "num_params_without_text_encoder": total - text}


def uses_text_encoder(config) -> bool:
  """Whether a run config fine-tunes a text encoder (and so reads `text_ids`)."""
  model = config.get("model") if hasattr(config, "get") else None
  return bool(model) and model.get("text_encoder", "features") == "bert"


__all__ = [
    "TEACHER_TEXT", "TEXT_ENCODERS", "TOKEN_KEYS", "TextEncoderModel", "build_with_text_encoder",
    "encode_text", "encoder_from_config", "frozen_teacher_forward", "masked_token_ids",
    "parameter_counts",
    "teacher_inputs",
    "uses_text_encoder", "with_text_encoder",
]
