"""Device mesh ('data', 'peer') and the placements of state and batches.

- Batches are split over `data` (every peer sees the same images): `P('data')`. BatchNorm statistics
  are over the global batch, as jit computes them on a data-sharded array (the 1-device semantics).
- Peer-stacked state (the peers' params and BatchNorm statistics, the method's per-peer heads, and
  the optimizer state of all of them, which has the params' tree structure) is split on its leading
  peer axis over `peer`: `P('peer')`, replicated over `data`. With `mesh.peer` = 1 this is plain
  data parallelism.
- Memory banks `[K, N, D]` (MCL ImageNet) are split `P('peer', 'data')`: peers over `peer`, the N
  example slots over `data`, so no device holds more than `1 / (data * peer)` of them.
- Everything else (step counter, class index tables, ...) is replicated.

An axis is only split when the mesh axis divides it (a 3-peer group on `peer` = 2 stays replicated).

Multi-host: every array is global; a process only ever materialises its addressable shards
(`global_batch` and `host_to_global` below), and jit runs the same program on every process.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

# Tree keys (dict keys or dataclass fields on the leaf's path) whose leaves are stacked per peer on
# axis 0, and those holding per-peer, per-example memory banks [K, N, ...].
PEER_STACKED_KEYS = ('peers', 'batch_stats', 'heads')
MEMORY_KEYS = ('memory',)


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, int]:
  """(data, peer) with `-1` for data meaning "all devices left over"."""
  peer = mesh_config.peer
  data = mesh_config.data if mesh_config.data > 0 else num_devices // max(peer, 1)
  return data, peer


def make_mesh(mesh_config, devices=None) -> Mesh:
  """`jax.make_mesh((data, peer), ('data', 'peer'))` over the first data x peer devices.

  Axes are `Auto` (jit/GSPMD partitions the step from the input and output shardings)."""
  devices = list(devices if devices is not None else jax.devices())
  data, peer = mesh_shape(mesh_config, len(devices))
  if data * peer > len(devices) or data < 1 or peer < 1:
    raise ValueError(f'mesh data x peer = {data} x {peer} needs more than the {len(devices)} '
                     f'devices here.')
  return jax.make_mesh((data, peer), ('data', 'peer'), axis_types=(AxisType.Auto,) * 2,
                       devices=devices[:data * peer])


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P('data'))


def _key_name(key) -> str | None:
  for attr in ('key', 'name'):
    value = getattr(key, attr, None)
    if isinstance(value, str):
      return value
  return None


def leaf_spec(path, shape, mesh: Mesh) -> P:
  """The PartitionSpec of one state leaf (see the module docstring)."""
  names = {_key_name(k) for k in path}
  peer, data = mesh.shape['peer'], mesh.shape['data']
  if names & set(MEMORY_KEYS) and len(shape) >= 2:
    return P('peer' if shape[0] % peer == 0 and peer > 1 else None,
             'data' if shape[1] % data == 0 and data > 1 else None)
  if names & set(PEER_STACKED_KEYS) and len(shape) >= 1 and peer > 1 and shape[0] % peer == 0:
    return P('peer')
  return P()


def state_sharding(mesh: Mesh, abstract_state):
  """NamedShardings for a TrainState (or any pytree of arrays / ShapeDtypeStructs)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: NamedSharding(mesh, leaf_spec(path, np.shape(leaf), mesh)),
      abstract_state)


# --------------------------------------------------------------------------------------------- #
# Host data -> global arrays (single- and multi-process).
# --------------------------------------------------------------------------------------------- #
def process_rows(sharding: NamedSharding, global_rows: int) -> np.ndarray:
  """The rows (axis 0) of a `[global_rows, ...]` array that this process's devices hold, in order.

  With `P('data')` and devices ordered by process these are one contiguous block per process."""
  rows = set()
  for index in sharding.addressable_devices_indices_map((global_rows,)).values():
    rows.update(range(global_rows)[index[0]])
  return np.asarray(sorted(rows), dtype=np.int64)


def global_batch(local_tree, sharding: NamedSharding, global_rows: int):
  """Assembles a global, `sharding`-placed batch from each process's rows of it
  (`jax.make_array_from_process_local_data`; one process: the whole batch)."""
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(
          sharding, np.asarray(x), (global_rows,) + np.shape(x)[1:]), local_tree)


def host_to_global(tree, sharding: NamedSharding):
  """Places host arrays that are identical on every process (the in-memory training set, an eval
  batch) in `sharding`; each process transfers only its addressable shards."""
  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
  return jax.tree.map(put, tree)


def describe(tree) -> dict:
  """{path: PartitionSpec string} of a pytree of arrays (for logs and tests)."""
  return {jax.tree_util.keystr(path): str(leaf.sharding.spec)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}
