"""The Python API: build a config, train, evaluate, and use a trained peer without the trainer.

Run from the repository root: `python examples/python_api.py [WORKDIR]` (about a minute on a CPU).
"""

import sys
import tempfile

import numpy as np

from mcl_jax import augment, cli, data, evaluate, export, train

workdir = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix='mcl_jax_')

# 1. A config: a config file with its `:args`, as `--config` reads it, then keys set in Python
#    (`cli.load_config(spec, {'optim.lr': 0.05})` sets them too, checking each key exists).
config = cli.load_config('configs/fashion_mnist_mcl.py:smoke')  # two ResNet-8 peers, MCL
config.total_steps = 12
config.eval_every_steps = 6
train.validate(config)  # ConfigError naming every bad key (train.run checks this first, too)

# 2. Train. Calling it again resumes from the newest checkpoint (or does nothing when finished).
#    Returns the last evaluation, under the names of <workdir>/metrics.jsonl.
metrics = train.run(config, workdir)
print('best peer top-1:', metrics['eval/best_peer/top1'])

# 3. Evaluate a checkpoint (the newest; or step=N), as `python -m mcl_jax.evaluate` does.
result = evaluate.evaluate(workdir)
print('evaluated step', result['step'], 'ensemble top-1:', result['eval/ensemble/top1'])

# 4. Export peer 0 and use it alone: a flax module, its variables, the data's normalisation.
export.export(workdir, peer='0', out=f'{workdir}/peer0.msgpack')
model, variables = export.load_peer(f'{workdir}/peer0.msgpack')
meta = export.load_metadata(f'{workdir}/peer0.msgpack')  # num_classes, mean, std, archs, step
test = data.load('fashion_mnist', 'test')  # uint8 images [N, 28, 28, 1] and int labels
images = augment.normalize(test.images[:500], meta['mean'], meta['std'])
logits = model.apply(variables, images, train=False)['logits']
accuracy = float(np.mean(np.argmax(logits, -1) == test.labels[:500]))
print(f'peer 0 on 500 test images: {accuracy:.2%}')
