"""Helpers shared by the tests and their subprocess scripts (not tests themselves)."""

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_config(**overrides):
  """A run of a few seconds on the embedded data: two ResNet-8 peers, 16-image batches."""
  from mcl_jax import config_lib, methods

  c = config_lib.base_config()
  c.model.arch = 'resnet8'
  c.cohort.num_peers = 2
  # A method.name override selects that method's section (its own keys at their defaults).
  name = overrides.pop('method.name', 'dml')
  c.method = methods.config(name) if name in methods.names() else {'name': name}
  c.batch_size = 16
  c.total_steps = 8
  c.data.train_examples = 128
  c.data.eval_examples = 64
  c.data.eval_batch_size = 32
  c.log_every_steps = 2
  c.eval_every_steps = 4
  c.ckpt_every_steps = 100
  c.optim.per_epoch = False
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c
