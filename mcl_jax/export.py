"""Export peers: `python -m mcl_jax.export --workdir DIR --peer K|all --out FILE [--step N]`.

Writes one peer (or every peer of the cohort) of a checkpoint as a plain msgpack file (Flax
serialization): per peer its architecture, `params` and `batch_stats`, plus the number of classes,
the model dtype and the per-channel normalisation mean/std of the training data. No trainer,
optimizer or method state is needed to use it:

    import numpy as np
    from mcl_jax import augment
    from mcl_jax.export import load_metadata, load_peer

    model, variables = load_peer('peer0.msgpack')           # a flax.linen module and its variables
    meta = load_metadata('peer0.msgpack')                   # num_classes, mean, std, archs, step
    images = augment.normalize(images_uint8, meta['mean'], meta['std'])  # [B, H, W, C] float32
    logits = model.apply(variables, images, train=False)['logits']       # [B, num_classes]

(`augment.normalize` is `(images / 255 - mean) / std` per channel.)
"""

from __future__ import annotations

import argparse
import sys

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from mcl_jax import checkpoint as ckpt_lib, evaluate, models
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
  exported peer indices."""
  if peer != 'all' and not peer.isdigit():
    raise ValueError(f'--peer={peer!r}: must be a peer index (0, 1, ...) or `all`.')
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
  if peer is None and len(stored) > 1:
    raise ValueError(f'{path} holds peers {stored}; pass peer=<one of them>.')
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
  try:
    peers = export(args.workdir, args.peer, args.out, args.step)
  except (ckpt_lib.CheckpointError, OSError, ValueError) as e:
    print(f'mcl_jax.export: error: {e}', file=sys.stderr)
    sys.exit(2)
  print(f'Wrote peers {peers} to {args.out}; load with mcl_jax.export.load_peer({args.out!r}).')


if __name__ == '__main__':
  main()
