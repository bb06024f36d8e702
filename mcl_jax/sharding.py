"""Device mesh ('data', 'peer') and the placements of state and batches.

Batches are split over `data` (every peer sees the same images; BatchNorm statistics are over the
global batch, as jit computes them on a data-sharded array). The stacked peer state is replicated
over `data`; with `mesh.peer` > 1 its leading peer axis is split over `peer`.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, int]:
  """(data, peer) with `-1` for data meaning "all devices left over"."""
  peer = mesh_config.peer
  data = mesh_config.data if mesh_config.data > 0 else num_devices // max(peer, 1)
  return data, peer


def make_mesh(mesh_config, devices=None) -> Mesh:
  devices = list(devices if devices is not None else jax.devices())
  data, peer = mesh_shape(mesh_config, len(devices))
  grid = np.asarray(devices[:data * peer]).reshape(data, peer)
  return Mesh(grid, ('data', 'peer'))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P('data'))


def state_sharding(mesh: Mesh, abstract_state):
  """Replicated state; peer-stacked leaves split over `peer` when that axis has more than one device."""
  if mesh.shape['peer'] == 1:
    return jax.tree.map(lambda _: replicated(mesh), abstract_state)

  def leaf_sharding(path, leaf):
    in_peers = any(getattr(k, 'name', getattr(k, 'key', None)) in ('peers', 'batch_stats')
                   for k in path)
    if in_peers and leaf.ndim >= 1 and leaf.shape[0] % mesh.shape['peer'] == 0:
      return NamedSharding(mesh, P('peer'))
    return replicated(mesh)
  return jax.tree_util.tree_map_with_path(leaf_sharding, abstract_state)
