r"""CIFAR-100 CRCD (Zhu et al., CVPR 2021), CRD's pair protocol as in the author's re-implementation
(docs/methods.md#crcd): `CE + w(t) [0.9 KD_4 + 1.0 (L_rel^feat + L_rel^grad)]`, K = 500,
T = 0.05, momentum 0.5, F = 128; 250 epochs, batch 64, SGD lr 0.05 (0.01 for MobileNetV2 /
ShuffleNet students), x0.1 at epochs 150/180/210, wd 5e-4; the last 10 epochs CE only.

    python -m mcl_jax.main --config configs/cifar100_teacher.py:arch=resnet32x4 --workdir W_T ...
    python -m mcl_jax.main --config configs/cifar100_crcd.py:pair=res32x4_res8x4,teacher=W_T \
        --workdir workdirs/c100_crcd_res32x4_res8x4 --config.data.data_dir=$TFDS_DATA_DIR

Arguments: pair (a key of PAIRS), teacher (the teacher run's workdir), seed, smoke.
Expected student top-1: UNKNOWN (the paper's CIFAR-100 tables were not available); the only
recovered number is ImageNet ResNet-34 -> ResNet-18 71.96 (configs/imagenet_crcd.py).
"""

from mcl_jax import config_lib, methods

# pair: (teacher arch, student arch, lr)
PAIRS = {
    'res32x4_res8x4': ('resnet32x4', 'resnet8x4', 0.05),
    'res56_res20': ('resnet56', 'resnet20', 0.05),
    'res110_res32': ('resnet110', 'resnet32', 0.05),
    'vgg13_vgg8': ('vgg13', 'vgg8', 0.05),
    'wrn40_2_wrn_16_2': ('wrn_40_2', 'wrn_16_2', 0.05),
    'wrn40_2_wrn_40_1': ('wrn_40_2', 'wrn_40_1', 0.05),
    'vgg13_mv2': ('vgg13', 'mobilenetv2', 0.01),
    'res50_mv2': ('resnet50_cifar', 'mobilenetv2', 0.01),
    'res32x4_shuv1': ('resnet32x4', 'shufflenetv1', 0.01),
    'res32x4_shuv2': ('resnet32x4', 'shufflenetv2_1_0', 0.01),
    'wrn40_2_shuv1': ('wrn_40_2', 'shufflenetv1', 0.01),
}


def get_config(arg=None):
  args = config_lib.parse_arg(arg, pair='res32x4_res8x4', teacher='', seed=0, smoke=False)
  if args['pair'] not in PAIRS:
    raise ValueError(f"pair={args['pair']!r}: use one of {sorted(PAIRS)}.")
  teacher_arch, student_arch, lr = PAIRS[args['pair']]
  c = config_lib.base_config()
  c.seed = args['seed']
  config_lib.set_cifar100(c)
  c.model.arch = student_arch
  c.cohort.num_peers = 1
  c.teacher.arch, c.teacher.checkpoint = teacher_arch, args['teacher']
  # CRCD's CIFAR protocol: the method's defaults (CE 1, KD 0.9 at T = 4, relations 1 and 1,
  # NCE tau 0.05 with K = 500, momentum 0.5, 128-d heads), distillation off for the last 10 of
  # the 250 epochs.
  c.method = methods.config('crcd', distill_fraction=24 / 25)
  config_lib.set_sgd(
      c,
      batch_size=64,
      epochs=250,
      lr=lr,
      weight_decay=5e-4,
      nesterov=False,
      schedule='multistep',
      milestones=(150, 180, 210),
  )
  return config_lib.finish(c, args['smoke'])
