"""Device mesh ('data', 'peer') and the placements of state and batches.

- Batches are split over `data` (every peer sees the same images): `P('data')`. BatchNorm statistics
  are over the global batch, as jit computes them on a data-sharded array (the 1-device semantics).
- Where state lives is declared, not guessed: the cohort (`Cohort.layout`) and each method
  (`Method.layout`) give every leaf a logical PartitionSpec, `PEER` (stacked per peer on axis 0),
  `PEER_EXAMPLE` (memory banks `[K, N, ...]`) or `REPLICATED`; the optimizer state follows the
  params' layout (`mcl_jax.step.state_layout`). On the mesh, 'peer' is split over `peer` and
  replicated over `data` (with `mesh.peer` = 1 this is plain data parallelism); a memory bank's N
  example slots are split over `data`, so no device holds more than `1 / (data * peer)` of it.

An axis is only split when the mesh axis divides it (a 3-peer group on `peer` = 2 stays replicated).

Multi-host: every array is global; a process only ever materialises its addressable shards
(`global_batch` and `host_to_global` below), and jit runs the same program on every process.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

# Logical placements that the cohort and the methods declare for their leaves (`Cohort.layout`,
# `Method.layout`): 'peer' is the mesh's 'peer' axis, 'example' (the N slots of a memory bank) its
# 'data' axis.
PEER = P('peer')  # stacked per peer on axis 0
PEER_EXAMPLE = P('peer', 'example')  # per peer, per training example: memory banks [K, N, ...]
REPLICATED = P()
LOGICAL_TO_MESH = {'peer': 'peer', 'example': 'data'}


def same_placement(tree, spec: P):
  """`spec` for every leaf of `tree` (e.g. all of a method's per-peer heads)."""
  return jax.tree.map(lambda _: spec, tree)


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
    raise ValueError(
        f'mesh data x peer = {data} x {peer} needs more than the {len(devices)} ' f'devices here.'
    )
  return jax.make_mesh(
      (data, peer),
      ('data', 'peer'),
      axis_types=(AxisType.Auto,) * 2,
      devices=devices[: data * peer],
  )


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P('data'))


def mesh_spec(logical: P, shape, mesh: Mesh) -> P:
  """The mesh PartitionSpec of a leaf of `shape` declared `logical`: each logical axis maps to its
  mesh axis (LOGICAL_TO_MESH) where that mesh axis is > 1 and divides the dimension; otherwise
  that dimension is replicated."""
  axes = []
  for dim, name in enumerate(tuple(logical)):
    mesh_axis = LOGICAL_TO_MESH.get(name) if name is not None else None
    if mesh_axis is None:
      axes.append(None)
      continue
    size = mesh.shape[mesh_axis]
    axes.append(mesh_axis if dim < len(shape) and size > 1 and shape[dim] % size == 0 else None)
  while axes and axes[-1] is None:
    axes.pop()
  return P(*axes)


def state_sharding(mesh: Mesh, abstract_state, layout):
  """NamedShardings of a pytree of arrays (or ShapeDtypeStructs) from its declared `layout` (a
  tree of logical PartitionSpecs with the same structure, e.g. `mcl_jax.step.state_layout`)."""
  return jax.tree.map(
      lambda leaf, logical: NamedSharding(mesh, mesh_spec(logical, np.shape(leaf), mesh)),
      abstract_state,
      layout,
      is_leaf=lambda x: isinstance(x, P),
  )


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
          sharding, np.asarray(x), (global_rows,) + np.shape(x)[1:]
      ),
      local_tree,
  )


def host_to_global(tree, sharding: NamedSharding):
  """Places host arrays that are identical on every process (the in-memory training set, an eval
  batch) in `sharding`; each process transfers only its addressable shards."""

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return jax.tree.map(put, tree)


def describe(tree) -> dict:
  """{path: PartitionSpec string} of a pytree of arrays (for logs and tests)."""
  return {
      jax.tree_util.keystr(path): str(leaf.sharding.spec)
      for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
  }
