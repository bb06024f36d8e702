"""Export peers: `python -m mcl_jax.export --workdir DIR --peer K|all --out FILE [--step N]`.

Writes one peer (or every peer of the cohort) of a checkpoint as a plain msgpack file (Flax
serialization): per peer its architecture, `params` and `batch_stats`, plus the number of classes,
the model dtype and the per-channel normalisation mean/std of the training data. No trainer,
optimizer or method state is needed to use it:

    import numpy as np
    from mcl_jax import augment, data
    from mcl_jax.export import load_metadata, load_peer

    model, variables = load_peer('peer0.msgpack')           # a flax.linen module and its variables
    meta = load_metadata('peer0.msgpack')                   # num_classes, mean, std, archs, step
    test = data.load('fashion_mnist', 'test')               # or your own images, see below
    images_uint8, labels = test.images[:100], test.labels[:100]
    images = augment.normalize(images_uint8, meta['mean'], meta['std'])  # [B, H, W, C] float32
    logits = model.apply(variables, images, train=False)['logits']       # [B, num_classes]
    accuracy = np.mean(np.argmax(logits, -1) == labels)

`images_uint8` are images as the run saw them: uint8 pixels [B, H, W, C] of the training data's
size and channels (28x28x1 for Fashion-MNIST, 32x32x3 for CIFAR); `augment.normalize` is
`(images / 255 - mean) / std` per channel. A file written with `--peer all` holds every peer: pick
one with `load_peer(path, peer=k)` (an int; `load_metadata(path)['archs']` lists them).
"""

from __future__ import annotations

import argparse
import os

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from mcl_jax import checkpoint as ckpt_lib, cli, evaluate, models, workdir as workdir_lib
from mcl_jax.cohort import peer_slice

FORMAT = 'mcl_jax.peers/1'


def peer_variables(cohort, state, k: int) -> tuple[str, dict]:
  """(arch, {'params', 'batch_stats'}) of peer `k` of the cohort, unstacked, on the host."""
  first = 0
  for g, group in enumerate(cohort.groups):
    if k < first + group.num_peers:
      variables = {'params': state.params['peers'][g], 'batch_stats': state.batch_stats[g]}
      return group.arch, jax.device_get(peer_slice(variables, k - first))
    first += group.num_peers
  raise ValueError(
      f'--peer={k}: the cohort has peers 0..{cohort.num_peers - 1}; pass one of them ' f'or `all`.'
  )


def export(workdir: str, peer: str, out: str, step: int | None = None) -> list[int]:
  """Writes peer `peer` (an index, or 'all') of the checkpoint of `step` to `out`; returns the
  exported peer indices. Checks `peer` and `out` before reading the checkpoint."""
  peer = str(peer)
  if peer != 'all' and not peer.isdigit():
    raise ValueError(f'--peer={peer!r}: must be a peer index (0, 1, ...) or `all`.')
  workdir_lib.require(workdir, workdir_lib.CONFIG_NAME)
  out_dir = os.path.dirname(os.path.abspath(out))
  if not os.path.isdir(out_dir):
    raise ValueError(f'--out {out}: the directory {out_dir} does not exist; create it first.')
  exp, state = evaluate.restore(workdir, step)
  peers = range(exp.cohort.num_peers) if peer == 'all' else [int(peer)]
  payload = {
      'format': FORMAT,
      'step': int(state.step),
      'num_classes': exp.train_data.num_classes,
      'dtype': exp.config.model.dtype,
      'mean': np.asarray(exp.train_data.mean, np.float32),
      'std': np.asarray(exp.train_data.std, np.float32),
      'peers': {},
  }
  for k in peers:
    arch, variables = peer_variables(exp.cohort, state, k)
    payload['peers'][str(k)] = {'arch': arch, **variables}
  with open(out, 'wb') as f:
    f.write(flax.serialization.msgpack_serialize(payload))
  return list(peers)


def _read(path: str) -> dict:
  with open(path, 'rb') as f:
    payload = flax.serialization.msgpack_restore(f.read())
  if payload.get('format') != FORMAT:
    raise ValueError(
        f'{path} is not a peer file written by `python -m mcl_jax.export` '
        f'(format {payload.get("format")!r}, expected {FORMAT!r}).'
    )
  return payload


def load_metadata(path: str) -> dict:
  """{'num_classes', 'dtype', 'mean', 'std', 'step', 'archs': {peer index: arch}} of a peer file."""
  payload = _read(path)
  meta = {k: v for k, v in payload.items() if k not in ('peers', 'format')}
  meta['mean'], meta['std'] = tuple(payload['mean'].tolist()), tuple(payload['std'].tolist())
  meta['archs'] = {int(k): p['arch'] for k, p in payload['peers'].items()}
  return meta


def load_peer(path: str, peer: int | None = None):
  """(model, variables) of a peer file: `model.apply(variables, images, train=False)['logits']`.

  `peer` picks one of the cohort's peers in a file exported with `--peer all` (default: the only
  peer the file holds). Images are normalised with the file's mean/std (`load_metadata`).
  """
  payload = _read(path)
  stored = sorted(int(k) for k in payload['peers'])
  if peer is not None and not isinstance(peer, (int, np.integer)):
    raise TypeError(
        f'peer={peer!r}: pass the peer index as an int, e.g. load_peer({path!r}, '
        f'peer={stored[0]}); {path} holds peers {stored}.'
    )
  if peer is None and len(stored) > 1:
    raise ValueError(
        f'{path} holds peers {stored} (exported with --peer all); pick one: '
        f'load_peer({path!r}, peer=k) with k in {stored}.'
    )
  k = stored[0] if peer is None else peer
  if k not in stored:
    raise ValueError(f'peer={peer}: {path} holds peers {stored}.')
  entry = payload['peers'][str(k)]
  dtype = jnp.bfloat16 if payload['dtype'] == 'bfloat16' else jnp.float32
  model = models.get_model(entry['arch'], int(payload['num_classes']), dtype=dtype)
  return model, {'params': entry['params'], 'batch_stats': entry['batch_stats']}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', required=True, help='run directory (holds config.json)')
  parser.add_argument('--peer', required=True, help='peer index (0, 1, ...) or `all`')
  parser.add_argument('--out', required=True, help='file to write, e.g. peer0.msgpack')
  parser.add_argument('--step', type=int, default=None, help='checkpoint step (default: newest)')
  args = parser.parse_args(argv)
  with cli.user_errors(
      'mcl_jax.export', ckpt_lib.CheckpointError, workdir_lib.WorkdirError, OSError, ValueError
  ):
    peers = export(args.workdir, args.peer, args.out, args.step)
  print(f'Wrote peers {peers} to {args.out}; {load_hint(args.out, peers)}')


def load_hint(path: str, peers: list[int]) -> str:
  """How to load what `export` wrote to `path` (README's snippet does the rest)."""
  if len(peers) == 1:
    return f'load with mcl_jax.export.load_peer({path!r}).'
  return f'load peer k with mcl_jax.export.load_peer({path!r}, peer=k), k in {peers}.'


if __name__ == '__main__':
  main()
