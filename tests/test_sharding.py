"""Sharded training over the ('data', 'peer') mesh equals 1-device training; placements; launch/.

The mesh tests run ONE subprocess with 8 fake CPU devices (tests/support/sharding_equivalence.py): memory-
bank MCL, ResNet-8, batch 16, 3 steps, on meshes (8,1), (4,2), (2,4) with K = 2 and 4, with the
peers under shard_map over 'peer' (default) and once left to jit's partitioner (":jit"), each
against the 1-device run of the same config, in float64 (model compute and the whole state;
`jax_enable_x64`).

Tolerance: 1e-5 of each leaf's scale (max|a - b| / max|b|) for params, BatchNorm statistics,
optimizer state and memory bank, 1e-5 relative for every metric, both for every single step run
from the 1-device state ("forced") and for the mesh's own 3-step trajectory ("free"). Sharding
only reorders sums (BatchNorm statistics and gradients become per-shard partial sums +
all-reduce); what remains is the float32 round-off of the parts that stay float32 (classifier,
embedding heads): measured 1e-7 .. 4e-7.

Why float64: in float32 a pre-activation within round-off of 0 flips its ReLU gradient; with ~1M
ReLU activations per step that happens every few steps, and one flip moves a late-stage BatchNorm
bias gradient by ~1/(B*H*W) ~ 1e-3 of its scale. Measured in float32 (`--float32`): forced single
steps 1.3e-6 .. 2.6e-6 except one step at 1.1e-3 (params) / 7.5e-3 (opt state); free 3-step
trajectories up to 3.6e-3 / 1.2e-2 -- the same divergence two 1-device programs that differ only in
reduction order show (benchmarks/results/sharding.md). The inputs carry fixed noise and no
zero-padded crops (`with_noise`): exact ties (constant background) flip even in float64.
"""

import json
import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from mcl_jax import config_lib, optim, sharding, train

from support import REPO, tiny_config

HELPER = os.path.join(REPO, 'tests', 'support', 'sharding_equivalence.py')
CASES = (
    '8x1:2:unroll',
    '4x2:2:unroll',
    '4x2:4:vmap',
    '2x4:4:vmap',
    '4x2:4:unroll:jit',
)
STATE_TOL = 1e-5
METRIC_TOL = 1e-5


@pytest.fixture(scope='module')
def mesh_runs(tmp_path_factory):
  out = str(tmp_path_factory.mktemp('sharding') / 'results.json')
  env = dict(os.environ, JAX_PLATFORMS='cpu')  # with the tests' XLA_FLAGS (tests/conftest.py)
  proc = subprocess.run(
      [sys.executable, HELPER, out, '--steps', '3', '--cases', ','.join(CASES)],
      capture_output=True,
      text=True,
      env=env,
      cwd=REPO,
      timeout=1800,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  with open(out) as f:
    return {r['case']: r for r in json.load(f)}


@pytest.mark.parametrize('case', CASES)
def test_sharded_training_equals_one_device(mesh_runs, case):
  r = mesh_runs[case]
  data, peer = map(int, case.split(':')[0].split('x'))
  assert r['mesh'] == {'data': data, 'peer': peer}
  assert r['step'] == 3
  for part in ('params', 'batch_stats', 'opt_state', 'method_state'):  # method_state: memory bank
    assert r['forced'][part] < STATE_TOL, ('forced', part, r['forced'][part])
    assert r['free'][part] < STATE_TOL, ('free', part, r['free'][part])
  assert r['forced_metrics'] < METRIC_TOL
  assert r['free_metrics'] < METRIC_TOL
  assert r['eval'] < 1e-9  # accuracy counts are exact
  assert {'ce', 'vcl', 'icl', 'soft_vcl', 'soft_icl', 'loss', 'lr'} <= set(r['metric_names'])


@pytest.mark.parametrize('case', CASES)
def test_step_compiles_once(mesh_runs, case):
  assert mesh_runs[case]['traces'] == 1 and mesh_runs[case]['ref_traces'] == 1


@pytest.mark.parametrize('case', CASES)
def test_placements(mesh_runs, case):
  r = mesh_runs[case]
  peer_split = r['mesh']['peer'] > 1
  peer_spec = str(P('peer')) if peer_split else str(P())
  memory_spec = str(P('peer', 'data') if peer_split else P(None, 'data'))
  for stage in ('init', 'final', 'restored'):
    placed = r['placements'][stage]
    assert placed == r['expected'], stage  # every leaf where state_sharding put it
    leaves = {path: spec for path, spec in placed.items()}
    peer_leaves = [p for p in leaves if p.startswith(".params['peers']")]
    assert peer_leaves and all(leaves[p] == peer_spec for p in peer_leaves)
    assert all(leaves[p] == peer_spec for p in leaves if p.startswith('.batch_stats'))
    assert all(leaves[p] == peer_spec for p in leaves if "['heads']" in p)
    # Optimizer state (SGD momentum) follows the params, leaf for leaf.
    momentum = {
        p.split("['peers']", 1)[1]: s
        for p, s in leaves.items()
        if p.startswith('.opt_state') and "['peers']" in p
    }
    assert momentum == {p.split("['peers']", 1)[1]: leaves[p] for p in peer_leaves}
    assert leaves[".method_state['memory']"] == memory_spec
    assert leaves['.step'] == str(P())
  assert set(r['placements']['batch'].values()) == {str(P('data'))}
  assert r['restored_equal']


def test_more_peer_devices_than_peers_is_rejected():
  config = tiny_config(**{'cohort.num_peers': 2, 'mesh.data': 2, 'mesh.peer': 4})
  with pytest.raises(config_lib.ConfigError, match='mesh.peer=4'):
    train.validate(config, num_devices=8)


def test_mesh_spec_maps_logical_axes_where_they_divide():
  mesh = AbstractMesh((4, 2), ('data', 'peer'))
  assert sharding.mesh_spec(sharding.PEER, (4, 3, 3), mesh) == P('peer')
  assert sharding.mesh_spec(sharding.PEER, (3, 3), mesh) == P()  # 3 % 2
  assert sharding.mesh_spec(sharding.PEER_EXAMPLE, (4, 128, 16), mesh) == P('peer', 'data')
  assert sharding.mesh_spec(sharding.PEER_EXAMPLE, (3, 130, 16), mesh) == P()
  assert sharding.mesh_spec(sharding.REPLICATED, (128,), mesh) == P()
  flat = AbstractMesh((8, 1), ('data', 'peer'))
  assert sharding.mesh_spec(sharding.PEER, (4, 3), flat) == P()
  assert sharding.mesh_spec(sharding.PEER_EXAMPLE, (4, 128, 16), flat) == P(None, 'data')


# (method, arch, per-peer leading size with K = 4 peers): MCL-OKD's views are its peers' branches.
LAYOUT_CASES = (
    ('independent', 'resnet8', 4),
    ('dml', 'resnet8', 4),
    ('mcl', 'resnet8', 4),
    ('mcl:memory_bank', 'resnet8', 4),
    ('lmcl', 'resnet8', 4),
    ('lmcl:memory_bank', 'resnet8', 4),
    ('mcl_okd', 'resnet8_okd2', 8),
    ('mcl', 'resnet8_okd2', 8),  # MCL on shared-trunk nets: a head per branch
    ('mcl:memory_bank', 'resnet8_okd2', 8),  # ... and a memory per branch
    ('kd', 'resnet8', 4),
    ('ckd', 'resnet8', 4),
    ('crcd', 'resnet8', 4),
    ('moco_mcl', 'resnet8', 4),  # key encoders and queues [K, Q, D] on 'peer'
)


@pytest.mark.parametrize('case,arch,num_views', LAYOUT_CASES)
def test_every_per_peer_leaf_is_declared_on_the_peer_axis(case, arch, num_views):
  """Each method declares its leaves' placement (no key-name guessing): on a (data 2, peer 4)
  mesh every leaf stacked per peer (leading axis K, or K x branches) is split over 'peer', memory
  banks [K, N, D] also over 'data', and nothing else is on 'peer'."""
  from mcl_jax import cohort as cohort_lib, methods, models
  from mcl_jax import step as step_lib

  name, _, variant = case.partition(':')
  overrides = {'memory_bank': True, 'num_negatives': 16} if variant else {}
  if name in ('mcl_okd', 'crcd'):
    overrides['num_negatives'] = 16
  if name == 'moco_mcl':
    overrides['augmentation'] = 'grey'  # one-channel images
  config = tiny_config(**{'method.name': name, 'model.arch': arch, 'cohort.num_peers': 4})
  config.method.update(overrides)
  num_train, num_classes = 64, 10
  run = train.run_info(config, num_train, num_classes)
  run = dataclasses.replace(run, teacher_arch='resnet8')
  method = methods.build(config.method, run)
  cohort = cohort_lib.build_cohort(config.model, config.cohort, num_classes)
  tx, _ = optim.make_optimizer(config.optim, 10, 5, config.batch_size)
  labels = np.arange(num_train, dtype=np.int32) % num_classes
  abstract = jax.eval_shape(
      lambda k: step_lib.create_state(cohort, method, tx, k, jnp.zeros((1, 28, 28, 1)), labels),
      jax.random.key(0),
  )
  layout = step_lib.state_layout(cohort, method, tx, abstract)
  mesh = AbstractMesh((2, 4), ('data', 'peer'))
  specs = jax.tree.map(
      lambda leaf, logical: sharding.mesh_spec(logical, leaf.shape, mesh),
      abstract,
      layout,
      is_leaf=lambda x: isinstance(x, P),
  )
  leaves = jax.tree_util.tree_leaves_with_path(abstract)
  spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
  assert len(leaves) == len(spec_leaves)
  on_peer = 0
  for (path, leaf), spec in zip(leaves, spec_leaves):
    where = jax.tree_util.keystr(path)
    per_peer = leaf.ndim >= 1 and leaf.shape[0] in (4, num_views)  # peers, or their views
    if per_peer:
      on_peer += 1
      assert tuple(spec)[:1] == ('peer',), f'{case}: {where} {leaf.shape} is placed {spec}'
    else:
      assert 'peer' not in tuple(spec), f'{case}: {where} {leaf.shape} is placed {spec}'
    if "['memory']" in where and leaf.ndim == 3:
      assert tuple(spec) == ('peer', 'data'), f'{case}: memory {where} is placed {spec}'
  assert on_peer > 0


def test_single_process_feeds_every_row():
  mesh = sharding.make_mesh(config_lib.base_config().mesh)
  assert mesh.axis_names == ('data', 'peer')
  rows = sharding.process_rows(sharding.batch_sharding(mesh), 16)
  np.testing.assert_array_equal(rows, np.arange(16))
  batch = sharding.global_batch({'x': np.arange(16)}, sharding.batch_sharding(mesh), 16)
  np.testing.assert_array_equal(np.asarray(batch['x']), np.arange(16))


def test_linear_lr_scaling():
  c = config_lib.base_config().optim
  assert optim.scaled_lr(c, 1024) == c.lr
  c.lr_scaling, c.lr_reference_batch, c.lr = 'linear', 256, 0.1
  assert optim.scaled_lr(c, 1024) == pytest.approx(0.4)
  schedule = optim.make_schedule(c, total_steps=10, steps_per_epoch=10, batch_size=512)
  assert float(schedule(0)) == pytest.approx(0.2)
  bad = tiny_config(**{'optim.lr_scaling': 'sqrt'})
  with pytest.raises(config_lib.ConfigError, match='optim.lr_scaling'):
    train.validate(bad)


# --------------------------------------------------------------------------------------------- #
# launch/ scripts
# --------------------------------------------------------------------------------------------- #
LAUNCH = os.path.join(REPO, 'launch')


def _bash(*args):
  return subprocess.run(['bash', *args], capture_output=True, text=True, cwd=REPO, timeout=60)


@pytest.mark.parametrize(
    'script', ['local.sh', 'tpu_pod.sh', 'gpu_multihost_slurm.sh', '_common.sh']
)
def test_launch_scripts_parse(script):
  proc = _bash('-n', os.path.join(LAUNCH, script))
  assert proc.returncode == 0, proc.stderr


def test_tpu_pod_dry_run():
  proc = _bash(
      os.path.join(LAUNCH, 'tpu_pod.sh'),
      '--dry-run',
      '--create',
      '--tpu',
      'mcl-pod',
      '--zone',
      'us-central2-b',
      '--accelerator',
      'v4-32',
      '--bucket',
      'gs://b',
      '--config',
      'configs/imagenet_mcl.py:arch=resnet18,peers=2',
      '--workdir',
      'gs://b/runs/r18x2',
      '--',
      '--config.mesh.peer=2',
  )
  assert proc.returncode == 0, proc.stderr
  commands = [l for l in proc.stdout.splitlines() if l.startswith('+ ')]
  assert len(commands) == 4
  assert commands[0].startswith('+ gcloud compute tpus tpu-vm create mcl-pod')
  assert 'scp --recurse' in commands[1] and '--worker=all' in commands[1]
  run = commands[3]
  for part in (
      '--worker=all',
      'TFDS_DATA_DIR=gs://b/tfds',
      'MCL_JAX_DISTRIBUTED=1',
      '--config configs/imagenet_mcl.py:arch=resnet18,peers=2',
      '--workdir gs://b/runs/r18x2',
      '--config.mesh.peer=2',
  ):
    assert part in run, part
  missing = _bash(os.path.join(LAUNCH, 'tpu_pod.sh'), '--dry-run', '--tpu', 'x')
  assert missing.returncode == 2 and 'required' in missing.stderr


def test_slurm_dry_run():
  env = {k: v for k, v in os.environ.items() if not k.startswith('SLURM_')}
  proc = subprocess.run(
      [
          'bash',
          os.path.join(LAUNCH, 'gpu_multihost_slurm.sh'),
          '--dry-run',
          'configs/imagenet_mcl.py:peers=4',
          '/nfs/r18x4',
          '--config.batch_size=1024',
      ],
      capture_output=True,
      text=True,
      cwd=REPO,
      env=env,
      timeout=60,
  )
  assert proc.returncode == 0, proc.stderr
  (command,) = [l for l in proc.stdout.splitlines() if l.startswith('+ ')]
  assert command.startswith('+ srun --ntasks-per-node=1')
  for part in (
      'JAX_COORDINATOR_ADDRESS=',
      'MCL_JAX_DISTRIBUTED=1',
      '-m mcl_jax.main',
      '--workdir /nfs/r18x4',
      '--config.batch_size=1024',
  ):
    assert part in command, part
  outside = subprocess.run(
      ['bash', os.path.join(LAUNCH, 'gpu_multihost_slurm.sh'), 'c', 'w'],
      capture_output=True,
      text=True,
      cwd=REPO,
      env=env,
      timeout=60,
  )
  assert outside.returncode == 2 and 'sbatch' in outside.stderr


def test_local_dry_run():
  proc = _bash(
      os.path.join(LAUNCH, 'local.sh'),
      '--dry-run',
      '--fake-cpu-devices',
      '8',
      'configs/fashion_mnist_mcl.py:smoke',
      '/tmp/fm8',
      '--config.mesh.peer=2',
  )
  assert proc.returncode == 0, proc.stderr
  (command,) = [l for l in proc.stdout.splitlines() if l.startswith('+ ')]
  assert 'XLA_FLAGS=--xla_force_host_platform_device_count=8' in command
  assert command.endswith(
      '-m mcl_jax.main --config configs/fashion_mnist_mcl.py:smoke '
      '--workdir /tmp/fm8 --config.mesh.peer=2'
  )
