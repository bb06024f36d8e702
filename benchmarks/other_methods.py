"""Per-step cost of MCL-OKD / KD / CKD / CRCD relative to a plain student step (CPU, quick-start size)."""
import json, sys, time
import jax, numpy as np
sys.path.insert(0, 'configs')
import fashion_mnist_kd
from mcl_jax import train

TEACHER = sys.argv[1]  # a fashion_mnist_kd.py:role=teacher workdir (resnet20)
STEPS = int(sys.argv[2]) if len(sys.argv) > 2 else 10
rows = {}
for label, arg in [('independent (plain ResNet-8 student)', 'method=independent'),
                   ('kd', f'method=kd,teacher={TEACHER}'),
                   ('ckd', f'method=ckd,teacher={TEACHER}'),
                   ('crcd (K=500)', f'method=crcd,teacher={TEACHER}'),
                   ('mcl_okd (resnet8_okd2: 2 branches, K=256)', 'method=mcl_okd')]:
  exp = train.Experiment(fashion_mnist_kd.get_config(arg))
  state = exp.init_state()
  times = []
  for step in range(STEPS + 2):
    batch = exp.batch(step)
    jax.block_until_ready(batch)
    t0 = time.perf_counter()
    state, metrics = exp.train_step(state, batch, exp.frozen)
    jax.block_until_ready(metrics)
    if step >= 2:
      times.append(time.perf_counter() - t0)
  rows[label] = 1e3 * float(np.median(times))
base = rows['independent (plain ResNet-8 student)']
for k, v in rows.items():
  print(json.dumps({'method': k, 'step_ms_median': round(v, 1), 'relative': round(v / base, 2)}))
