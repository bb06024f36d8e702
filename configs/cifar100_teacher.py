r"""CIFAR-100 teachers for CKD / CRCD / KD students: one network trained alone with CE (CRD's
protocol: 240 epochs, batch 64, SGD 0.05 momentum 0.9, wd 5e-4, x0.1 at epochs 150/180/210).

    python -m mcl_jax.main --config configs/cifar100_teacher.py:arch=resnet32x4 \
        --workdir workdirs/c100_teacher_resnet32x4 --config.data.data_dir=$TFDS_DATA_DIR

Arguments: arch (resnet32x4 | resnet56 | resnet110 | vgg13 | wrn_40_2 | ...), seed, smoke. The
workdir is then the `teacher=` argument of configs/cifar100_ckd.py and configs/cifar100_crcd.py.
(Our resnet110 is the bottleneck variant of the MCL code, not CRD's basic-block one.)
Expected top-1: no reference number is available to us; report the measured number with the
student runs.
"""

from mcl_jax import config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, arch='resnet32x4', seed=0, smoke=False)
  c = config_lib.base_config()
  c.seed = args['seed']
  config_lib.set_cifar100(c)
  c.model.arch = args['arch']
  c.cohort.num_peers = 1
  config_lib.set_sgd(
      c,
      batch_size=64,
      epochs=240,
      lr=0.05,
      weight_decay=5e-4,
      nesterov=False,
      schedule='multistep',
      milestones=(150, 180, 210),
  )
  return config_lib.finish(c, args['smoke'])
