r"""ImageNet CRCD (Zhu et al., CVPR 2021) (docs/methods.md#crcd): `CE + 0.9 KD_4 + 1.0 (L_rel^feat
+ L_rel^grad)` with NCE K = 16384, T = 0.05, momentum 0.5, F = 128. The authors' ImageNet recipe
is not in their code; we use CRD's ImageNet protocol (a choice): 100 epochs, batch 256, SGD 0.1
momentum 0.9, wd 1e-4, x0.1 at epochs 30/60/90; the teacher frozen in inference mode.

    python -m mcl_jax.main --config configs/imagenet_mcl.py:arch=resnet34,baseline --workdir W_T \
        --config.data.data_dir=$TFDS_DATA_DIR
    python -m mcl_jax.main --config configs/imagenet_crcd.py:pair=r34_r18,teacher=W_T \
        --workdir gs://BUCKET/crcd_r34_r18 --config.data.data_dir=$TFDS_DATA_DIR

Data: `tfds build imagenet2012 --data_dir=$TFDS_DATA_DIR --file_format=array_record`. Arguments:
pair (r34_r18: ResNet-34 -> ResNet-18 | r50_mv1: ResNet-50 -> MobileNet-V1), teacher (the teacher
run's workdir), seed, smoke.
Expected student top-1: ResNet-34 -> ResNet-18 71.96 (the only number of the paper we could
recover); ResNet-50 -> MobileNet-V1 UNKNOWN. Not reproduced here (no ImageNet on this machine).
"""

from mcl_jax import config_lib, methods

# pair: (teacher arch, student arch)
PAIRS = {'r34_r18': ('resnet34', 'resnet18'), 'r50_mv1': ('resnet50', 'mobilenetv1')}


def get_config(arg=None):
  args = config_lib.parse_arg(arg, pair='r34_r18', teacher='', seed=0, smoke=False)
  if args['pair'] not in PAIRS:
    raise ValueError(f"pair={args['pair']!r}: use one of {sorted(PAIRS)}.")
  teacher_arch, student_arch = PAIRS[args['pair']]
  c = config_lib.base_config()
  c.seed = args['seed']
  config_lib.set_imagenet(c)
  c.model.arch = student_arch
  c.cohort.num_peers = 1
  c.teacher.arch, c.teacher.checkpoint = teacher_arch, args['teacher']
  # (smoke trains on 512 images: the negatives must come from fewer)
  c.method = methods.config('crcd', num_negatives=256 if args['smoke'] else 16384)
  config_lib.set_sgd(
      c,
      batch_size=256,
      epochs=100,
      lr=0.1,
      weight_decay=1e-4,
      nesterov=False,
      schedule='multistep',
      milestones=(30, 60, 90),
  )
  return config_lib.finish(c, args['smoke'])
