"""The Ray executor on a real two-node Ray cluster on this machine: the same UAPs and results as the local one."""
import os
from pathlib import Path

import pytest

from auditkit import api
from auditkit.errors import AuditkitError
from conftest import json_without_times, write_policy

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install \"auditkit[ray]\")")
REPO = Path(__file__).resolve().parents[1]
STORE_BYTES = 200 * 1024**2


@pytest.fixture(scope="module")
def two_nodes():
    """A head and a second node of one CPU each, as separate raylets (their workers import this checkout)."""
    from ray.cluster_utils import Cluster

    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), saved]))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": STORE_BYTES})
    try:
        cluster.add_node(num_cpus=1, object_store_memory=STORE_BYTES)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        cluster.shutdown()
        if saved is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = saved


def uaps(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "uaps").glob("*.npy"))}


@pytest.mark.slow
def test_cells_as_ray_tasks_on_two_nodes_equal_the_local_run(two_nodes, tmp_path, tiny_model, phantom_manifest):
    policy = write_policy(tmp_path / "p.yaml")
    common = dict(data=phantom_manifest, formats=["json"], resume=False)
    local = api.run(tiny_model, policy, tmp_path / "local", jobs=1, **common)
    remote = api.run(tiny_model, policy, tmp_path / "ray", executor="ray", ray_address=two_nodes.address, **common)
    assert len(remote.cells) == 4 and uaps(tmp_path / "ray") == uaps(tmp_path / "local")
    assert json_without_times(tmp_path / "ray" / "results.json") == \
        json_without_times(tmp_path / "local" / "results.json")
    assert local.verdict == remote.verdict
    assert not ray.is_initialized()  # the executor leaves the cluster as it found it


def test_unknown_executor_and_a_stray_ray_address_are_refused_before_any_work(tmp_path, tiny_model):
    with pytest.raises(AuditkitError, match="unknown executor 'dask'"):
        api.run(tiny_model, "policies/quick.yaml", tmp_path / "o", executor="dask")
    with pytest.raises(AuditkitError, match="only applies with --executor ray"):
        api.run(tiny_model, "policies/quick.yaml", tmp_path / "o", ray_address="127.0.0.1:6379")
    assert not (tmp_path / "o").exists()
