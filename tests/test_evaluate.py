"""Batched scenario evaluation: several scenarios in one compiled, vmapped call give what
one call per scenario gives, whatever the grouping."""

import dataclasses

import jax
import numpy as np
import pytest
from helpers import random_batch, tiny_spec
from ml_collections import ConfigDict

from mer_jax import evaluate, parallel
from mer_jax.config_lib import base_config
from mer_jax.data import missing
from mer_jax.methods import dqf
from mer_jax.trainer import Predictor

SPEC = tiny_spec("classification", num_classes=3)


# The tests share module fixtures (compiled programs): one worker builds them.
pytestmark = pytest.mark.xdist_group("evaluate")


@pytest.fixture(scope="module")
def dqf_setup():
  config = base_config()
  dqf.configure(config, "tiny")
  config.data.task = SPEC.task
  (stage,) = dqf.build(config, SPEC)
  split = random_batch(SPEC, batch_size=21, seed=3)
  split["id"] = np.array([str(i) for i in range(21)])
  example = random_batch(SPEC, 2)
  params = jax.jit(lambda key: stage.model.init(key, example, train=False)["params"])(
      jax.random.key(0))
  # Batches of 8 over 4 devices: three batches, the last one padded.
  predictor = Predictor(stage, parallel.make_mesh(0), 8, on_device=True)
  return predictor, params, split


def _eval_config(per_call):
  return ConfigDict({"fixed": True, "missing_rates": (0.3, 0.6), "frame_rates": (0.5,),
                     "frame_sets": ("L", "AV"), "noise_intensities": (0.5,),
                     "scenarios_per_call": per_call})


@pytest.mark.slow
def test_batched_scenarios_equal_one_call_each(dqf_setup):
  predictor, params, split = dqf_setup
  rng = np.random.default_rng(0)
  masks = rng.random((5, 21, 3)) < 0.6
  rates = rng.uniform(0, 0.9, (5, 3)).astype(np.float32)
  noise = np.array([0.0, 0.3, 0.0, 1.0, 0.2], np.float32)
  keys = jax.random.split(jax.random.key(7), 5)
  batched = predictor.predict_scenarios(params, {}, split, modality_masks=masks,
                                        frame_rates=rates, noise_intensities=noise, keys=keys)
  assert batched["output"].shape == (5, 21, 3)
  for s in range(5):
    single = predictor.predict_split(params, {}, split, modality_mask=masks[s],
                                     frame_rates=rates[s], noise_intensity=float(noise[s]),
                                     key=keys[s])
    np.testing.assert_allclose(batched["output"][s], single["output"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(batched["embedding"][s], single["embedding"], rtol=1e-5,
                               atol=1e-5)
  # A scenario with every modality absent differs from the full one: masks reach the model.
  assert not np.allclose(batched["output"][0], batched["output"][3])


@pytest.mark.slow
def test_run_scenarios_does_not_depend_on_grouping(dqf_setup):
  predictor, params, split = dqf_setup
  key = jax.random.key(1)
  one, _ = evaluate.run_scenarios(predictor, params, {}, split, SPEC, _eval_config(1), key=key)
  grouped, _ = evaluate.run_scenarios(predictor, params, {}, split, SPEC, _eval_config(4),
                                      key=key)
  # 7 fixed + 2 MR + 2 frame + 1 noise scenarios; 4 per call leaves a padded last group.
  names = [n for n in one if n != "summary"]
  assert len(names) == 12 and list(grouped) == list(one)
  # The same scenarios with every one through the frame-masking forward (a stage whose
  # network does not take the masks itself).
  generic = Predictor(dataclasses.replace(predictor.stage, masks_in_network=False),
                      predictor.mesh, 8, on_device=True)
  each_masked, _ = evaluate.run_scenarios(generic, params, {}, split, SPEC, _eval_config(4),
                                          key=key)
  for name in names:
    for metric, value in one[name].items():
      for other in (grouped, each_masked):
        np.testing.assert_allclose(other[name][metric], value, rtol=1e-5, atol=1e-6,
                                   err_msg=f"{name}/{metric}")


def test_modality_only_scenarios_are_called_apart():
  # 7 fixed, 2 MR, 1 frame-0.0 (modalities only), then a frame drop and a noise scenario.
  kinds = [True] * 10 + [False, False]
  groups = evaluate._scenario_groups(list(range(12)), kinds, 4)
  assert groups == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9], [10, 11]]
  assert evaluate._scenario_groups([0, 1, 2], [False, True, False], 8) == [[1], [0, 2]]
  assert evaluate._scenario_groups([0, 2, 3], [True, True, False, True], 8) == [[0, 3], [2]]


class _RecordingPredictor:
  """Stands in for a `Predictor`: records the scenarios of each call and returns, per row,
  the number of available modalities plus a per-scenario random part (which a shared
  result could not reproduce) when frames drop."""

  def __init__(self):
    self.calls = []

  def predict_scenarios(self, params, method_state, split, *, modality_masks, frame_rates,
                        noise_intensities, keys):
    self.calls.append(np.asarray(frame_rates))
    counts = modality_masks.sum(-1).astype(np.float32)  # (S, N)
    noise = np.stack([jax.random.uniform(k, counts.shape[1:]) for k in keys])
    output = counts + noise * (frame_rates.sum(-1, keepdims=True) > 0)
    return {"output": output[..., None], "embedding": np.stack([output] * 2, -1)}


def test_scenarios_with_the_inputs_of_an_earlier_one_are_not_run_again():
  split = random_batch(tiny_spec("regression"), batch_size=6, seed=0)
  config = ConfigDict({"fixed": True, "missing_rates": (0.5,), "frame_rates": (0.0, 0.5),
                       "frame_sets": ("L", "AV"), "noise_intensities": (),
                       "scenarios_per_call": 4})
  predictor = _RecordingPredictor()
  results, embeddings = evaluate.run_scenarios(
      predictor, None, None, split, tiny_spec("regression"), config, key=jax.random.key(0),
      keep_embeddings=True)
  names = [s.name for s in missing.eval_scenarios(config)]
  assert list(results) == names + ["summary"]
  # 7 fixed + MR0.5 run (two calls of 4); frame0.0_L and frame0.0_AV are LAV's inputs and
  # share its results; the two frame-0.5 scenarios take one call of their own.
  assert [len(rates) for rates in predictor.calls] == [4, 4, 4]
  assert [np.any(call, axis=-1).tolist() for call in predictor.calls] == [[False] * 4] * 2 + [
      [True] * 4]
  for name in ("frame0.0_L", "frame0.0_AV"):
    assert results[name] == results["LAV"]
    np.testing.assert_array_equal(embeddings[name], embeddings["LAV"])
  assert results["frame0.5_L"] != results["frame0.5_AV"]
