r"""CIFAR-100 CKD (Zhu et al., arXiv 2404.14109), the official configs
(docs/methods.md#ckd): `CE + w_cl * ckd_loss(tau)`, 480 epochs, SGD momentum 0.9, wd 5e-4,
cosine per epoch to 0.

    python -m mcl_jax.main --config configs/cifar100_teacher.py:arch=resnet32x4 --workdir W_T ...
    python -m mcl_jax.main --config configs/cifar100_ckd.py:pair=res32x4_res8x4,teacher=W_T \
        --workdir workdirs/c100_ckd_res32x4_res8x4 --config.data.data_dir=$TFDS_DATA_DIR

Arguments: pair (a key of PAIRS), teacher (the teacher run's workdir), kd (plain KD instead of
CKD, the "with plain KD" row; CRD's 0.1 CE + 0.9 KD, T = 4), baseline (the student alone), seed,
smoke. Expected student top-1: UNKNOWN (the paper's tables were not available; never cite
numbers we do not have).
`python -m mcl_jax.rows --paper ckd` lists every pair with its teacher's command.
"""

from mcl_jax import config_lib, methods

# pair: (teacher arch, student arch, batch, lr, w_cl, tau)
PAIRS = {
    'res32x4_res8x4': ('resnet32x4', 'resnet8x4', 64, 0.05, 100.0, 1.0),
    'res56_res20': ('resnet56', 'resnet20', 64, 0.05, 10.0, 1.0),
    'res110_res32': ('resnet110', 'resnet32', 64, 0.05, 10.0, 1.0),
    'vgg13_vgg8': ('vgg13', 'vgg8', 64, 0.05, 100.0, 1.0),
    'wrn40_2_wrn_16_2': ('wrn_40_2', 'wrn_16_2', 64, 0.05, 100.0, 1.0),
    'wrn40_2_wrn_40_1': ('wrn_40_2', 'wrn_40_1', 32, 0.05, 50.0, 2.0),
    'vgg13_mv2': ('vgg13', 'mobilenetv2', 32, 0.01, 50.0, 2.0),
    'res50_mv2': ('resnet50_cifar', 'mobilenetv2', 32, 0.01, 100.0, 1.0),
    'res32x4_shuv1': ('resnet32x4', 'shufflenetv1', 32, 0.01, 100.0, 1.0),
    'res32x4_shuv2': ('resnet32x4', 'shufflenetv2_1_0', 64, 0.01, 100.0, 1.0),
    'wrn40_2_shuv1': ('wrn_40_2', 'shufflenetv1', 32, 0.01, 100.0, 1.0),
}


def get_config(arg=None):
  args = config_lib.parse_arg(
      arg, pair='res32x4_res8x4', teacher='', kd=False, baseline=False, seed=0, smoke=False
  )
  if args['pair'] not in PAIRS:
    raise ValueError(f"pair={args['pair']!r}: use one of {sorted(PAIRS)}.")
  teacher_arch, student_arch, batch, lr, w_cl, tau = PAIRS[args['pair']]
  c = config_lib.base_config()
  c.seed = args['seed']
  config_lib.set_cifar100(c)
  c.model.arch = student_arch
  c.cohort.num_peers = 1
  c.teacher.arch, c.teacher.checkpoint = teacher_arch, args['teacher']
  if args['baseline']:
    c.method = methods.config('independent')
  elif args['kd']:
    c.method = methods.config('kd')  # CRD's KD baseline: 0.1 CE + 0.9 KD at T = 4
  else:
    c.method = methods.config('ckd', ce_weight=1.0, ckd_weight=w_cl, tau=tau)
  # CosineAnnealingLR stepped once per epoch.
  config_lib.set_sgd(
      c, batch_size=batch, epochs=480, lr=lr, weight_decay=5e-4, nesterov=False, schedule='cosine'
  )
  return config_lib.finish(c, args['smoke'])
