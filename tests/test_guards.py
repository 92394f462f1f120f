"""Guards against silently wrong runs: the non-finite loss guard ("stop" names the step,
the terms and the last good checkpoint; "skip" skips and counts), config and workdir
validation before anything compiles, and prediction inputs (errors name the key; bad
samples get an `error` field, the others their prediction)."""

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import Toy, load_config, random_batch, read_log, tiny_spec, toy_train_config

from mer_jax import config_lib, parallel, predict, train, trainer
from mer_jax.data.pipeline import Batcher
from mer_jax.methods import SUPPORTED_TASKS
from mer_jax.methods.base import Stage

POISON_ROW = 5  # the training sample whose loss term goes NaN from the second epoch on


def toy_stage(log_output=False):
  model = Toy(log_output=log_output)

  def loss_fn(params, method_state, batch, key, context):
    del key
    out = model.apply({"params": params}, batch, train=True)
    task = jnp.mean(jnp.abs(out["output"] - batch["label"]))
    poisoned = (context.epoch >= 1) & jnp.any(batch["index"] == POISON_ROW)
    aux = jnp.where(poisoned, jnp.nan, 0.1) * jnp.mean(out["output"] ** 2)
    return task + aux, ({"loss_task": task, "loss_aux": aux}, method_state)

  return Stage(name="", model=model, loss_fn=loss_fn, num_epochs=3)


SPEC = tiny_spec("regression")


def toy_config(on_nonfinite, log_every_steps):
  return toy_train_config(on_nonfinite=on_nonfinite, log_every_steps=log_every_steps)


def toy_splits():
  train_split = random_batch(SPEC, 32, seed=0)
  return {"train": train_split, "valid": random_batch(SPEC, 16, seed=1)}




def test_nonfinite_is_stop_by_default():
  assert config_lib.base_config().train.on_nonfinite == "stop"


@pytest.mark.parametrize("log_every_steps", [1, 100])  # caught at a log step / epoch end
@pytest.mark.slow
def test_nonfinite_stop_names_step_terms_and_checkpoint_then_skip_resumes(tmp_path,
                                                                          log_every_steps):
  workdir = str(tmp_path)
  mesh = parallel.make_mesh(2)
  splits = toy_splits()
  stage = toy_stage()
  # The poisoned row's step in epoch 2 (steps are counted from 1, 4 per epoch).
  rows = Batcher(splits["train"], 8, mesh, on_device=False).epoch_rows(0, 1)
  expected_step = 4 + int(np.flatnonzero((rows == POISON_ROW).any(axis=1))[0]) + 1
  handler = signal.getsignal(signal.SIGTERM)

  with pytest.raises(trainer.NonFiniteError) as raised:
    trainer.train_stage(stage, toy_config("stop", log_every_steps), splits, SPEC, mesh,
                        workdir)
  good = os.path.join(workdir, "checkpoints", "latest", "9")  # end of epoch 1: 2 * 4 + 1
  message = str(raised.value)
  assert f"step {expected_step}" in message
  assert "loss_aux" in message and "loss_task" not in message
  assert good in message
  assert "on_nonfinite=skip" in message
  assert raised.value.terms[0] == "loss_aux" and set(raised.value.terms) == {
      "loss_aux", "loss", "grad_norm"}
  assert signal.getsignal(signal.SIGTERM) is handler  # the pre-emption handler is removed
  events = [r for r in read_log(workdir) if r.get("event") == "nonfinite"]
  assert events == [{"event": "nonfinite", "stage": "toy", "step": expected_step,
                     "terms": ["loss_aux", "grad_norm", "loss"], "checkpoint": good}]
  assert [r["epoch"] for r in read_log(workdir) if "val/loss" in r] == [1]
  assert os.listdir(os.path.dirname(good)) == ["9"]
  saved = trainer.read_checkpoint(os.path.dirname(good))
  assert int(saved["step"]) == 4
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(saved["params"]))

  # As the message says: resuming with "skip" finishes, skipping (and counting) the
  # poisoned step of each later epoch.
  params, _ = trainer.train_stage(stage, toy_config("skip", log_every_steps), splits, SPEC,
                                  mesh, workdir)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
  epochs = [r for r in read_log(workdir) if "val/loss" in r]
  assert [r["epoch"] for r in epochs] == [1, 2, 3]
  assert [r["train/skipped_steps"] for r in epochs] == [0, 1, 1]
  assert all(np.isfinite(r["val/loss"]) for r in epochs)
  if log_every_steps == 1:
    steps = {r["step"]: r["train/skipped"] for r in read_log(workdir)
             if "train/skipped" in r and "val/loss" not in r}
    assert steps[expected_step] == 1.0 and sum(steps.values()) == 2.0


def test_changing_on_nonfinite_may_resume_but_other_changes_are_refused(tmp_path):
  config = load_config()
  train.write_config(config, str(tmp_path))
  changed = load_config()
  changed.train.on_nonfinite = "skip"
  train.check_workdir(changed, str(tmp_path))  # no error
  changed.train.learning_rate = 0.5
  with pytest.raises(ValueError, match=r"train\.learning_rate: .* -> 0\.5"):
    train.check_workdir(changed, str(tmp_path))
  train.check_workdir(changed, str(tmp_path), allow_config_change=True)


# ----------------------------------------------------------------------------- config


def set_field(config, field, value):
  *parents, name = field.split(".")
  node = config
  for parent in parents:
    node = node[parent]
  with config.unlocked():
    node[name] = value


@pytest.fixture
def compile_events():
  """The names of the jax compile events of the test (`jax.monitoring`)."""
  events = []
  listener = lambda event, duration, **kwargs: events.append(event)
  jax.monitoring.register_event_duration_secs_listener(listener)
  yield events
  jax.monitoring.unregister_event_duration_listener(listener)


def compiled(events):
  return [e for e in events if "compile" in e]


def test_the_compile_listener_sees_a_compilation(compile_events):
  """Positive control of the "nothing compiled" assertions below."""
  assert not compiled(compile_events)
  jax.jit(lambda x: x * 2.718 + 0.5772)(jnp.ones(3)).block_until_ready()
  assert compiled(compile_events)


@pytest.mark.parametrize("config_file,field,value,pattern", [
    ("dqf_mosei.py", "method", "mculr", r"config\.method='mculr': unknown method; choose one of"),
    ("dqf_mosei.py", "data.source", "mmsaa", r"config\.data\.source='mmsaa': unknown data source"),
    ("dqf_mosei.py", "data.task", "ordinal", r"config\.data\.task='ordinal': unknown task"),
    ("dqf_mosei.py", "train.batch_size", 6, r"config\.train\.batch_size=6: must be divisible by "
     r"the number of devices \(4\)"),
    ("dqf_mosei.py", "eval.batch_size", 30, r"config\.eval\.batch_size=30: must be divisible"),
    ("dqf_mosei.py", "num_devices", 5, r"config\.num_devices=5: must be between 0 .* 4 visible"),
    ("dqf_mosei.py", "train.on_nonfinite", "ignore",
     r"config\.train\.on_nonfinite='ignore': choose one of"),
    ("dqf_mosei.py", "train.optimizer", "lamb", r"config\.train\.optimizer='lamb'"),
    ("dqf_mosei.py", "missing.kind", "dropout",
     r"config\.missing\.kind='dropout': unknown training protocol"),
    ("dqf_mosei.py", "missing.probs", (0.0,) * 7, r"config\.missing\.probs=.*positive sum"),
    ("dqf_mosei.py", "train.num_epochs", 0, r"config\.train\.num_epochs=0: must be >= 1"),
    ("dqf_mosei.py", "train.selection_scenarios", "frames",
     r"config\.train\.selection_scenarios='frames': choose one of"),
    ("dqf_mosei.py", "data.max_lengths", (50, 50), r"config\.data\.max_lengths=\(50, 50\)"),
    # A method's own fields, checked when its stages are built for a stand-in dataset.
    ("cmarr_iemocap.py", "model.flow_input", "raw", r"config\.model\.flow_input='raw'"),
    ("cmarr_iemocap.py", "loss.rec_norm", "l1", r"config\.loss\.rec_norm='l1'"),
])
def test_invalid_config_fails_before_loading_or_compiling(tmp_path, monkeypatch, compile_events,
                                                          config_file, field, value, pattern):
  config = load_config(config_file)
  set_field(config, field, value)
  monkeypatch.setattr(train.pipeline, "load_data", lambda *a: pytest.fail("data loaded"))
  with pytest.raises(ValueError, match=pattern):
    train.run(config, str(tmp_path / "run"))
  assert not compiled(compile_events)
  assert not os.path.exists(tmp_path / "run")


def test_method_that_cannot_do_the_task_fails_before_training(tmp_path, monkeypatch):
  monkeypatch.setitem(SUPPORTED_TASKS, "dqf", ("classification",))
  monkeypatch.setattr(train, "train_stage", lambda *a, **k: pytest.fail("trained"))
  with pytest.raises(ValueError, match=r"config\.method='dqf': cannot do the 'regression' "
                     r"task of dataset 'mosei' \(config\.data\.task\); it supports"):
    train.run(load_config(), str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")


def test_dataset_task_and_split_size_are_checked_against_the_config():
  config = load_config()
  classification = tiny_spec("classification")
  with pytest.raises(ValueError, match=r"config\.data\.task='regression': but the dataset "
                     r"'tiny' .* is a 'classification' dataset"):
    config_lib.validate_config(config, classification)
  with pytest.raises(ValueError, match=r"config\.train\.batch_size=16: is larger than the "
                     r"training split \(10 samples\)"):
    config_lib.validate_config(config, SPEC, num_train=10)
  config_lib.validate_config(config, SPEC, num_train=64)


def test_workdir_of_another_config_is_refused_before_loading(tmp_path, monkeypatch):
  config = load_config()
  train.write_config(config, str(tmp_path))
  other = load_config()
  other.seed = 3
  monkeypatch.setattr(train.pipeline, "load_data", lambda *a: pytest.fail("data loaded"))
  with pytest.raises(ValueError, match=r"config\.json holds a run with a different config "
                     r"\(seed: 0 -> 3\).*--allow_config_change"):
    train.run(other, str(tmp_path))


def test_shipped_configs_pass_validation(repo_root):
  for name in sorted(os.listdir(os.path.join(repo_root, "configs"))):
    if name.endswith(".py"):
      for variant in ("", "tiny"):
        config = load_config(name, variant)
        if config.model.text_encoder == "bert" and not config.model.text_encoder_path:
          # A real config that fine-tunes BERT needs the reader's BERT folder: without it,
          # the one-line stop; with the frozen-feature alternative it names, it passes.
          with pytest.raises(ValueError, match=r"^config\.model\.text_encoder_path='': .*"
                                               r"--config\.model\.text_encoder=features"):
            config_lib.validate_config(config)
          config.model.text_encoder = "features"
        config_lib.validate_config(config)


# ----------------------------------------------------------------------------- prediction


def toy_model(log_output=False):
  """A predict.Model around an untrained Toy network (Model.__init__ would load a run)."""
  stage = toy_stage(log_output)
  model = object.__new__(predict.Model)
  model.spec = SPEC
  model.stage = stage
  model.mesh = parallel.make_mesh(1)
  model.params = stage.model.init(jax.random.key(0), random_batch(SPEC, 2))["params"]
  model.method_state = {}
  model.predictor = trainer.Predictor(stage, model.mesh, 8, on_device=False)
  return model


def features(num, seed=0):
  rng = np.random.default_rng(seed)
  return {name: rng.normal(size=(num, SPEC.lengths[i], SPEC.dims[i])).astype(np.float32)
          for i, name in enumerate(("text", "audio", "vision"))}


@pytest.mark.parametrize("change,pattern", [
    (lambda a: a.update(text=a["text"][..., :6]), r"key 'text' has shape \(3, 6, 6\); "
     r"expected \(3, T, 7\)"),
    (lambda a: a.update(audio=a["audio"].astype(str)), r"key 'audio' has dtype <U.*expected "
     "real numbers"),
    (lambda a: a.update(vision=a["vision"].astype(np.complex64)), r"key 'vision' has dtype "
     "complex64"),
    (lambda a: a.update(audio=a["audio"][:2]), r"key 'audio' has shape \(2, 5, 5\); "
     r"expected \(3, T, 5\)"),
    (lambda a: a.update(txt=a.pop("text")), r"unknown keys \['txt'\]"),
    (lambda a: a.update(text_mask=np.ones((3, 2), bool)), r"key 'text_mask' has shape"),
    (lambda a: a.update(text_mask=np.full((3, 6), 2)), r"key 'text_mask' must be bool"),
    (lambda a: a.update(audio_lengths=np.array([1.5, 2, 3])), r"key 'audio_lengths' must be"),
    (lambda a: a.update(id=np.array(["a", "b"])), r"key 'id' has shape \(2,\)"),
    (lambda a: [a.pop(k) for k in ("text", "audio", "vision")], r"none of the keys"),
])
def test_whole_input_problems_raise_naming_the_key(change, pattern):
  arrays = features(3)
  change(arrays)
  with pytest.raises(ValueError, match=f"^in.npz: .*{pattern}"):
    predict.prepare_inputs(arrays, SPEC, source="in.npz")


def test_bad_samples_get_an_error_field_and_the_others_their_prediction():
  model = toy_model()
  arrays = features(6)
  arrays["text_lengths"] = np.array([6, 6, 0, 3, 9, 6])
  arrays["audio_lengths"] = np.array([5, 5, 0, 5, 5, 5])
  arrays["vision_mask"] = np.ones((6, 4), bool)
  arrays["vision_mask"][2] = False
  arrays["text"][1, 2, 0] = np.nan  # a real frame: error
  arrays["text"][3, 4, 1] = np.nan  # beyond the 3 real frames: ignored
  arrays["audio"] = arrays["audio"].astype(np.float64)
  arrays["audio"][5, 0, 0] = 1e300  # not representable in float32
  arrays["id"] = np.array(list("abcdef"))
  records = model(arrays)

  assert [r["id"] for r in records] == list("abcdef")
  errors = {r["id"]: r.get("error") for r in records}
  assert errors["b"] == "key 'text' has NaN or inf values in real frames"
  assert errors["c"] == "every modality is absent (no real frame of text, audio or vision)"
  assert errors["e"] == "text_lengths is 9, outside 0..6 (the frames of 'text')"
  assert errors["f"] == "key 'audio' has NaN or inf values in real frames"
  for record in records:
    if record["id"] in "bcef":
      assert "score" not in record and "entropy" not in record
  assert records[2]["available"] == []
  good = [r for r in records if r["id"] in "ad"]
  assert all(np.isfinite(r["score"]) and "error" not in r for r in good)
  # The bad samples change nothing for the good ones: predicted alone, the same numbers.
  alone = model({k: v[[0, 3]] for k, v in arrays.items()})
  np.testing.assert_allclose([r["score"] for r in alone], [r["score"] for r in good],
                             rtol=1e-6)


def test_a_non_finite_model_output_is_an_error_not_a_number():
  model = toy_model(log_output=True)
  arrays = features(4)
  arrays["text"][:, :, 0] = np.array([1.0, -1.0, 2.0, -3.0])[:, None]
  records = model(arrays)
  assert [r.get("error") for r in records] == [None, "the model output is not finite"] * 2
  np.testing.assert_allclose([records[0]["score"], records[2]["score"]], np.log([1.0, 2.0]),
                             rtol=1e-6)
  assert model({k: v[:0] for k, v in arrays.items()}) == []
