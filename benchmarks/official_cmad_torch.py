r"""Times the official CMAD PyTorch student step on this machine, for issue 17's comparison.

Not part of mer_jax and never imported by it: it needs PyTorch, which the project does not
install, and a checkout of the official code (YetZzzzzz/CMAD). Set it up outside the
project's virtual environment, then run it next to `mer_jax.bench` on the same machine:

    python3.12 -m venv /tmp/torchenv
    /tmp/torchenv/bin/pip install torch numpy einops "transformers==4.36.2"
    git clone https://github.com/YetZzzzzz/CMAD /tmp/cmad
    /tmp/torchenv/bin/python benchmarks/official_cmad_torch.py --official /tmp/cmad

(transformers 4.36: the official `student_model.py` builds on `BertPreTrainedModel` as
it was then; later releases dropped the helpers it imports and changed `init_weights`.
PyPI's torch wheel brings CUDA libraries it does not use on CPU; the figures of
docs/performance.md were taken with it, torch 2.14.1, 2 threads, MKL.)

What runs: the official `StudentModel` and `TeacherModel` at the README's MOSEI command
(d_l 96, 16 heads, depth 5, 5 latents, te_layers 2, batch 128; 7,437,569 student
parameters), the frozen teacher in evaluation mode, and one step of the body of
`train_student_model_mosei.py`'s batch loop: teacher forward, student forward with its
random modality drop, CAFD (`compute_weighted_mse_loss`), the logit distillation and task
losses weighted by the MAR weights of the first epoch (all ones), backward and AdamW.
BERT is replaced by MOSEI-shaped text features (B, 50, 768) fed to `proj_l`, the same
network without BERT, as `mer_jax.bench` runs it with `--config.model.text_encoder=features`.

FLOPs: `torch.utils.flop_counter` on one step (matrix products, forward and backward).
The matmul rates of both frameworks are printed (a 1024 x 1024 fp32 product, the same
reference as `mer_jax.bench.matmul_flops_per_second`), so that the fraction can be read
against either: the two libraries do not reach the same rate on the same cores.
"""

import argparse
import json
import os
import sys
import time
import types

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

BATCH, FRAMES = 128, 50
# The README's student command for MOSEI; stu_config_mosei.py's defaults for the rest.
OFFICIAL_ARGS = dict(
    d_l=96, num_heads=16, te_layers=2, num_latents=5, depth=5, dropout_prob=0.3,
    relu_dropout=0.3, res_dropout=0.3, embed_dropout=0.2, attn_dropout=0.5,
    p_attn_dropout=0.0, p_ff_dropout=0.0, TEXT_DIM=768, ACOUSTIC_DIM=74, VISUAL_DIM=35,
    tau=0.2, temperature=7.0, delta=0.1, gamma=1.0, weight_decay=5e-4,
    learning_rate=2e-5, adam_epsilon=1e-8)
MODALITY_COMBINATIONS = [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 1], [1, 1, 0], [0, 1, 1],
                         [1, 1, 1]]


def import_official(checkout: str):
  """The official modules. transformers 4.36 no longer has three helpers that
  `student_model.py` imports and never calls; they are set to None for the import."""
  import transformers.modeling_utils as modeling_utils
  for name in ("apply_chunking_to_forward", "find_pruneable_heads_and_indices",
               "prune_linear_layer"):
    if not hasattr(modeling_utils, name):
      setattr(modeling_utils, name, None)
  sys.path.insert(0, os.path.join(checkout, "CMAD_sentiment", "Student_Model"))
  import loss
  import student_model
  import teacher_model
  return student_model.StudentModel, teacher_model.TeacherModel, loss


class TextFeatures(nn.Module):
  """`BERT_TM` after BERT: the official Conv1d (k = 3) over the (B, T, 768) features."""

  def __init__(self, proj_l):
    super().__init__()
    self.proj_l = proj_l

  def forward(self, features, **unused):
    return self.proj_l(features.transpose(1, 2))


def build_models(checkout: str):
  from transformers import BertConfig
  student_cls, teacher_cls, loss = import_official(checkout)
  args = types.SimpleNamespace(**OFFICIAL_ARGS)
  config = BertConfig(num_hidden_layers=1)  # BERT's encoder is replaced, never run

  def build(cls):
    model = cls(config, args)
    model.bert = TextFeatures(model.bert.proj_l)
    return model

  teacher, student = build(teacher_cls), build(student_cls)
  teacher.eval()  # as train_student_model_mosei.py: frozen, evaluation mode
  for param in teacher.parameters():
    param.requires_grad = False
  student.p = [0, 0, 0]  # the training-time random modality drop
  return student, teacher, loss, args


def make_train_step(student, teacher, loss, args):
  no_decay = ["bias", "LayerNorm.weight"]
  named = list(student.named_parameters())
  optimizer = torch.optim.AdamW([
      {"params": [p for n, p in named if not any(d in n for d in no_decay)],
       "weight_decay": args.weight_decay},
      {"params": [p for n, p in named if any(d in n for d in no_decay)], "weight_decay": 0.0},
  ], lr=args.learning_rate, eps=args.adam_epsilon)
  combinations = torch.tensor(MODALITY_COMBINATIONS)
  mar_weights = torch.ones(7)  # the first epoch's MAR weights
  task_loss = nn.L1Loss(reduction="none")

  def train_step(batch):
    text, visual, acoustic, label = batch
    optimizer.zero_grad()
    teacher_logits, teacher_hidden = teacher(text, visual, acoustic, label)
    student_logits, student_hidden, drawn = student(text, visual, acoustic, label)
    cafd, _, _ = loss.compute_weighted_mse_loss(student_hidden, teacher_hidden, args.tau)
    student_logits, teacher_logits = student_logits.view(-1), teacher_logits.view(-1)
    distill = loss.regression_loss(student_logits, teacher_logits, args.temperature)
    task = task_loss(student_logits, label.view(-1))
    scenario = (drawn.unsqueeze(1) == combinations).all(dim=2).float()
    mar_distill = torch.einsum("i,ij,j->i", distill, scenario, mar_weights).mean()
    mar_task = torch.einsum("i,ij,j->i", task, scenario, mar_weights).mean()
    total = args.delta * cafd + mar_task + args.gamma * mar_distill
    total.backward()
    optimizer.step()
    return total

  return train_step


def synthetic_batches(count: int = 4):
  rng = np.random.default_rng(0)
  shape = lambda width: (BATCH, FRAMES, width)
  as_tensor = lambda x: torch.tensor(x, dtype=torch.float32)
  return [(as_tensor(rng.normal(size=shape(768))), as_tensor(rng.normal(size=shape(35))),
           as_tensor(rng.normal(size=shape(74))), as_tensor(rng.uniform(-3, 3, (BATCH, 1))))
          for _ in range(count)]


def timed(fn, repeats: int) -> list[float]:
  fn()  # warm-up, untimed (PyTorch runs eagerly: nothing is left in flight)
  times = []
  for _ in range(repeats):
    started = time.perf_counter()
    fn()
    times.append(time.perf_counter() - started)
  return times


def matmul_flops_per_second(size: int = 1024) -> float:
  a = torch.ones(size, size)
  return 2 * size**3 / float(np.median(timed(lambda: a @ a, 5)))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--official", required=True, help="checkout of YetZzzzzz/CMAD")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--jax_matmul_flops_per_second", type=float, default=None,
                      help="the same run's mer_jax.bench matmul_flops_per_second")
  cli = parser.parse_args()
  torch.manual_seed(0)
  student, teacher, loss, args = build_models(cli.official)
  train_step = make_train_step(student, teacher, loss, args)
  batches = synthetic_batches()
  with FlopCounterMode(display=False) as counter:
    train_step(batches[0])
  step_flops = counter.get_total_flops()
  with FlopCounterMode(display=False) as counter, torch.no_grad():
    teacher(*batches[0])
  teacher_flops = counter.get_total_flops()

  def run_steps():
    for i in range(cli.steps):
      train_step(batches[i % len(batches)])

  step_times = [t / cli.steps for t in timed(run_steps, cli.repeats)]
  median = float(np.median(step_times))
  matmul_rate = matmul_flops_per_second()
  record = {
      "torch": torch.__version__, "threads": torch.get_num_threads(),
      "num_params": sum(p.numel() for p in student.parameters()),
      "batch_size": BATCH,
      "train_steps_per_second": 1 / median,
      "train_steps_per_second_min": 1 / max(step_times),
      "train_steps_per_second_max": 1 / min(step_times),
      "train_samples_per_second": BATCH / median,
      "train_step_flops": step_flops, "teacher_forward_flops": teacher_flops,
      "train_flops_per_second": step_flops / median,
      "torch_matmul_flops_per_second": matmul_rate,
      "fraction_of_torch_matmul_rate": step_flops / median / matmul_rate,
  }
  if cli.jax_matmul_flops_per_second:
    record["fraction_of_jax_matmul_rate"] = (step_flops / median
                                             / cli.jax_matmul_flops_per_second)
  print(json.dumps(record))


if __name__ == "__main__":
  main()
