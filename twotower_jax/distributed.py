"""More than one process: `jax.distributed` from flags or the cluster's environment, and which rows of a
global batch this process feeds.

Each process runs the same program over a global mesh of every process's devices; arrays are built
from process-local pieces with `jax.make_array_from_process_local_data`. A process initialises once,
before it touches a device:

    from twotower_jax import distributed
    distributed.initialize(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=0)

With no arguments `initialize` joins a cluster JAX can detect by itself (Slurm, TPU pods, Open MPI,
GKE…) and is a no-op on a single machine, so the same script runs everywhere.
"""
from __future__ import annotations

import os
from typing import Optional

import jax
import numpy as np

# Environment variables by which JAX's cluster auto-detection recognises a multi-process job.
_CLUSTER_ENV = ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS",
                "JAX_COORDINATOR_ADDRESS")


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, *, from_environment: Optional[bool] = None,
               local_device_ids=None) -> bool:
    """Joins the job; call before any other JAX call that touches devices. Returns whether
    `jax.distributed` was initialised.

    Explicit flags win (all three, or none; one process needs no coordinator and initialises nothing).
    Without them: `from_environment=True` joins the cluster JAX detects by itself (a CLI's
    `--distributed`), `False` stays one process, `None` (default) joins when a known cluster environment
    variable is set (Slurm, Open MPI, TPU pods, `JAX_COORDINATOR_ADDRESS`)."""
    given = [coordinator_address is not None, num_processes is not None, process_id is not None]
    if any(given) and not all(given):
        raise ValueError("coordinator address, number of processes and process id go together: got "
                         f"{coordinator_address!r}, {num_processes!r}, {process_id!r}")
    if all(given):
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ValueError(f"process id {process_id} is outside [0, {num_processes})")
        if num_processes == 1:
            return False
        jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                   local_device_ids=local_device_ids)
        return True
    if from_environment is None:
        from_environment = any(name in os.environ for name in _CLUSTER_ENV)
    if from_environment:
        jax.distributed.initialize()
    return bool(from_environment)


def shutdown() -> None:
    """Leaves a multi-process job explicitly; call at the end of a program that joined one. With jax 0.12.1 a
    process that trained with orbax checkpoints and left the job at interpreter exit (jax's own atexit
    shutdown) hung there after its work was done; shutting down before returning from main exits. One
    process: nothing to do."""
    if jax.process_count() > 1:
        jax.distributed.shutdown()


def process_rows(global_batch: int, process_index: Optional[int] = None,
                 process_count: Optional[int] = None) -> slice:
    """The contiguous rows of a global batch this process feeds (processes in index order, equal parts).
    Matches a mesh whose `data` axis is laid out process by process (as `jax.devices()` orders them)."""
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if global_batch % count:
        raise ValueError(f"global batch {global_batch} does not split evenly over {count} processes")
    per = global_batch // count
    return slice(index * per, (index + 1) * per)


def global_array(batch: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """A global array from a batch every process computed whole (the training data is a pure function
    of the step): each process transfers only the shards its own devices hold."""
    batch = np.asarray(batch)
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    return jax.make_array_from_callback(batch.shape, sharding, lambda index: batch[index])


def process_local_array(local: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """A global array of P·b rows from each of P processes' own b rows (b, ...), in process order: process
    p's rows become global rows [p·b, (p+1)·b). For data each process reads itself (a per-host shard of a
    text pipeline) rather than computing the whole batch. The sharding must split rows so that process p's
    devices hold exactly those rows (a mesh whose `data` axis spans the processes in index order, as
    `jax.devices()` orders them); anything else (rows replicated over processes, an interleaved device
    order) is refused, since each process's rows would then not be its own."""
    local = np.asarray(local)
    count, index = jax.process_count(), jax.process_index()
    global_shape = (local.shape[0] * count, *local.shape[1:])
    if count == 1:
        return jax.device_put(local, sharding)
    expected = range(index * local.shape[0], (index + 1) * local.shape[0])
    held = set()
    for slices in sharding.addressable_devices_indices_map(global_shape).values():
        held.update(range(*slices[0].indices(global_shape[0])) if slices else range(global_shape[0]))
    if held != set(expected):
        raise ValueError(
            f"process {index} of {count} feeds its own {local.shape[0]} rows as global rows "
            f"[{expected.start}, {expected.stop}), but the batch sharding puts rows {sorted(held)[:4]}... "
            f"({len(held)} rows) on its devices: the mesh's data axis must span the processes in order")
    return jax.make_array_from_process_local_data(sharding, local, global_shape)


def allgather_json(value) -> list:
    """Every process's JSON-serialisable `value`, in process order, on every process (one allgather of
    lengths, one of the padded UTF-8 bytes). One process: `[value]`."""
    import json
    if jax.process_count() == 1:
        return [json.loads(json.dumps(value))]
    from jax.experimental import multihost_utils
    data = np.frombuffer(json.dumps(value, sort_keys=True).encode("utf-8"), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.int32(len(data)))).reshape(-1)
    padded = np.zeros((int(lengths.max()),), np.uint8)
    padded[:len(data)] = data
    everyone = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), -1)
    return [json.loads(bytes(row[:n]).decode("utf-8")) for row, n in zip(everyone, lengths)]
