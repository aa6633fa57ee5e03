"""A multi-node Ray cluster on one machine, for the cluster tests and the 2-node benchmark.

Each node is its own set of Ray processes (raylet, object store, workers) with its own node id and
resources, started by Ray's ``ray.cluster_utils.Cluster`` (the utility Ray's own tests use): stages run on
it exactly as on a real cluster (``ray.address`` set, Ray results on ``ray.storage_path``), and a node can
be killed to test recovery. A real cluster is started with ``ray start`` / ``ray up`` instead
(docs/cluster.md).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Sequence


@contextmanager
def local_cluster(node_cpus: Sequence[float] = (2, 1), env: Mapping[str, str] | None = None) -> Iterator[Any]:
    """A head node plus one node per further entry of ``node_cpus`` (logical CPUs of each); yields the
    ``Cluster`` (``.address`` for ``ray.address``, ``.worker_nodes`` to kill one). ``env`` is set while the
    nodes start, so their worker processes inherit it (e.g. ``SBIR_FAULT_INJECT``). Any Ray instance this
    process was connected to is shut down first: a driver talks to one instance at a time."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": node_cpus[0], "include_dashboard": False})
    try:
        for cpus in node_cpus[1:]:
            cluster.add_node(num_cpus=cpus)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def node_of(cluster: Any, node_id: str) -> Any:
    """The cluster's node object whose Ray node id is ``node_id`` (to kill the node that hosts a worker)."""
    for node in [cluster.head_node, *cluster.worker_nodes]:
        if node is not None and node.node_id == node_id:
            return node
    raise KeyError(f"no node {node_id} in the cluster")
