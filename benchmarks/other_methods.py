r"""Per-step cost of MCL-OKD / KD / CKD / CRCD relative to a plain student step (CPU, quick-start size).

    python -m mcl_jax.main --config configs/fashion_mnist_kd.py:role=teacher,smoke --workdir /tmp/fmt
    python benchmarks/other_methods.py /tmp/fmt [ROUNDS]

The teacher workdir only needs the right architecture (ResNet-20), so a smoke teacher serves. Every
method's jitted train step is built first, then timed round-robin (ROUNDS rounds of 3 steps per
method, after 2 warm-up steps each), so slow drifts of a shared machine hit all methods alike.
Prints one JSON line per method: median step ms and the ratio to the plain student step.
"""

import json
import statistics
import sys

sys.path.insert(0, 'configs')
import fashion_mnist_kd  # pylint: disable=g-import-not-at-top
from mcl_jax import train  # pylint: disable=g-import-not-at-top
from timing import time_round_robin, warm_up  # pylint: disable=g-import-not-at-top

TEACHER = sys.argv[1]  # a fashion_mnist_kd.py:role=teacher workdir (resnet20)
ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 4
BASE = 'independent (ResNet-8 student alone)'
METHODS = [
    (BASE, 'method=independent', {}),
    ('kd (+ teacher ResNet-20 forward, KL)', f'method=kd,teacher={TEACHER}', {}),
    ('ckd (+ teacher forward, B x B logit InfoNCE)', f'method=ckd,teacher={TEACHER}', {}),
    ('crcd, K = 64 (the Fashion-MNIST config)', f'method=crcd,teacher={TEACHER}', {}),
    (
        'crcd, K = 500 (the CIFAR protocol)',
        f'method=crcd,teacher={TEACHER}',
        {'num_negatives': 500},
    ),
    ('mcl_okd (resnet8_okd2: shared stem, 2 branches, K = 256)', 'method=mcl_okd', {}),
    (
        'okd branches alone (dot_weight = contrast_weight = 0)',
        'method=mcl_okd',
        {'dot_weight': 0.0, 'contrast_weight': 0.0},
    ),
]


def build(arg, method_overrides):
  config = fashion_mnist_kd.get_config(arg)
  config.method.update(method_overrides)
  exp = train.Experiment(config)
  return exp, exp.init_state()


def main():
  runs = {}
  for label, arg, overrides in METHODS:
    exp, state = build(arg, overrides)
    runs[label] = (exp, warm_up(exp, state)[0])
  times = time_round_robin(runs, ROUNDS)
  base = statistics.median(times[BASE])
  for label, seconds in times.items():
    ms = 1e3 * statistics.median(seconds)
    print(
        json.dumps(
            {
                'method': label,
                'step_ms_median': round(ms, 1),
                'relative': round(ms / (1e3 * base), 2),
                'steps_timed': len(seconds),
            }
        )
    )


if __name__ == '__main__':
  main()
