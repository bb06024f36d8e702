r"""Linear evaluation of a frozen peer (MoCo's / the MCL authors' main_lincls.py protocol).

    python -m mcl_jax.linear_eval --workdir RUN [--peer P] [--config configs/linear_eval.py[:args]]

This config is for `mcl_jax.linear_eval`, not for training (`mcl_jax.main`); see that module's
docstring for the protocol, the outputs and resuming. Defaults are the protocol: a new linear
classifier on the frozen backbone's pooled feature (BatchNorm in inference mode), SGD lr 30,
momentum 0.9, no weight decay, batch 256, 100 epochs, lr x0.1 at epochs 60 and 80, augmented
training views (the data source's own: pad-crop + flip for small images, RandomResizedCrop + flip
for ImageNet), the test split without augmentation, top-1 and top-5.

Arguments (`--config configs/linear_eval.py:data=fashion_mnist_full,epochs=20,cached`):
  data      a registered data set to probe instead of the run's own (transfer; same image shape)
  epochs    number of epochs; the lr milestones stay at 60% and 80% of them
  augment   augmented training views through the frozen backbone every step (default True)
  cached    = augment=False: each training image's feature computed once, the linear layer
            trained on the cached features (much faster on a CPU; not the protocol's views)
  seed      the linear layer's initialisation, the batch order and the augmentation
  smoke     a few steps on a few images (2 epochs of 512 images, 256 test images)
Any key can also be set with `--config.<key>=<value>`, e.g. `--config.lr=0.5`.
"""

import ml_collections

from mcl_jax import config_lib

# The protocol's epochs and milestones (lr x0.1), scaled together by the `epochs` argument.
PROTOCOL_EPOCHS, PROTOCOL_MILESTONES = 100, (60, 80)


def get_config(arg=None):
  args = config_lib.parse_arg(
      arg, data='', epochs=PROTOCOL_EPOCHS, augment=True, cached=False, seed=0, smoke=False
  )
  c = ml_collections.ConfigDict()
  c.data = ml_collections.ConfigDict(
      dict(
          name=args['data'],  # '': the run's own data set; else a registered one (transfer)
          data_dir='',  # '': the run's data_dir for its own data set, else the source's default
          train_examples=0,  # > 0: a fixed subset of the training split (0: all of it)
          eval_examples=0,  # > 0: the first N test examples (0: all of them)
          eval_batch_size=500,  # images per batch through the frozen backbone (cached features)
      )
  )
  c.batch_size = 256
  c.epochs = args['epochs']
  c.lr = 30.0
  c.momentum = 0.9
  c.weight_decay = 0.0
  c.milestones = tuple(round(m * args['epochs'] / PROTOCOL_EPOCHS) for m in PROTOCOL_MILESTONES)
  c.decay_factor = 0.1
  c.augment = args['augment'] and not args['cached']
  c.seed = args['seed']
  c.log_every_steps = 500  # metrics.jsonl also gets a line at the end of every epoch
  c.smoke = args['smoke']
  if args['smoke']:
    c.epochs, c.milestones, c.batch_size = 2, (1,), 64
    c.data.train_examples, c.data.eval_examples, c.data.eval_batch_size = 512, 256, 128
    c.log_every_steps = 4
  return c
