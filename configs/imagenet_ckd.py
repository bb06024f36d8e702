r"""ImageNet CKD (Zhu et al., arXiv 2404.14109), the official ImageNet settings
(docs/methods.md#ckd): `CE + 10 * ckd_loss(tau = 1)`, 200 epochs, batch 512, SGD lr 0.2 momentum
0.9, wd 1e-4, cosine per epoch to 0; the teacher frozen in inference mode.

    python -m mcl_jax.main --config configs/imagenet_mcl.py:arch=resnet34,baseline --workdir W_T \
        --config.data.data_dir=$TFDS_DATA_DIR
    python -m mcl_jax.main --config configs/imagenet_ckd.py:pair=r34_r18,teacher=W_T \
        --workdir gs://BUCKET/ckd_r34_r18 --config.data.data_dir=$TFDS_DATA_DIR

Data: `tfds build imagenet2012 --data_dir=$TFDS_DATA_DIR --file_format=array_record`. Arguments:
pair (r34_r18: ResNet-34 -> ResNet-18 | r50_mv1: ResNet-50 -> MobileNet-V1), teacher (the teacher
run's workdir; the papers use torchvision's pretrained teachers, we train ours with the baseline
recipe above), baseline (the student alone), seed, smoke.
Expected student top-1: UNKNOWN (the paper's ImageNet table was not available; never cite numbers
we do not have). Not reproduced here (no ImageNet on this machine).
"""

from mcl_jax import config_lib, methods

# pair: (teacher arch, student arch)
PAIRS = {'r34_r18': ('resnet34', 'resnet18'), 'r50_mv1': ('resnet50', 'mobilenetv1')}


def get_config(arg=None):
  args = config_lib.parse_arg(arg, pair='r34_r18', teacher='', baseline=False, seed=0, smoke=False)
  if args['pair'] not in PAIRS:
    raise ValueError(f"pair={args['pair']!r}: use one of {sorted(PAIRS)}.")
  teacher_arch, student_arch = PAIRS[args['pair']]
  c = config_lib.base_config()
  c.seed = args['seed']
  config_lib.set_imagenet(c)
  c.model.arch = student_arch
  c.cohort.num_peers = 1
  c.teacher.arch, c.teacher.checkpoint = teacher_arch, args['teacher']
  if args['baseline']:
    c.method = methods.config('independent')
  else:
    c.method = methods.config('ckd', ce_weight=1.0, ckd_weight=10.0, tau=1.0)
  config_lib.set_sgd(
      c, batch_size=512, epochs=200, lr=0.2, weight_decay=1e-4, nesterov=False, schedule='cosine'
  )
  return config_lib.finish(c, args['smoke'])
