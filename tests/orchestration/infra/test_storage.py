"""pipelines/infra/storage.py: which checkpoint paths and MLflow stores a multi-node run may use.

Mount tables are written by hand (the /proc/mounts format), so every filesystem kind is covered on
any machine; one test reads this machine's real /proc/mounts.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.infra.storage import (
    Mount,
    StorageNotShared,
    check_storage_for_cluster,
    count_nodes_for_run,
    is_shared_fs_type,
    mount_of,
    read_mounts,
)

MOUNTS_TEXT = """\
/dev/vda / ext4 rw,relatime 0 0
tmpfs /dev/shm tmpfs rw 0 0
fs-1234.efs.us-west-2.amazonaws.com:/ /mnt/efs nfs4 rw,vers=4.1 0 0
10.0.0.5:/export /mnt/nfs nfs rw 0 0
//filer/share /mnt/smb cifs rw 0 0
10.0.0.9@tcp:/lustre /lustre lustre rw 0 0
gpfs0 /gpfs gpfs rw 0 0
10.0.0.7:6789:/ /mnt/ceph ceph rw 0 0
elf-bucket /mnt/gcs fuse.gcsfuse rw 0 0
lxcfs /var/lib/lxcfs fuse.lxcfs rw 0 0
/dev/vdb /mnt/my\\040disk ext4 rw 0 0
/dev/vdc /mnt/nfs/local-scratch xfs rw 0 0
"""


@pytest.fixture
def mounts(tmp_path: Path) -> list[Mount]:
    f = tmp_path / "mounts"
    f.write_text(MOUNTS_TEXT)
    return read_mounts(f)


def test_read_mounts_parses_and_unescapes(mounts: list[Mount]) -> None:
    assert len(mounts) == 12
    assert mounts[2] == Mount("/mnt/efs", "nfs4", "fs-1234.efs.us-west-2.amazonaws.com:/")
    assert mounts[10].mount_point == "/mnt/my disk"  # \040 is a space


@pytest.mark.parametrize("path, mount_point", [
    ("/mnt/efs/elf/ray", "/mnt/efs"),
    ("/mnt/nfs/runs", "/mnt/nfs"),
    ("/mnt/nfs/local-scratch/x", "/mnt/nfs/local-scratch"),  # the longest prefix wins
    ("/mnt/nfsother/x", "/"),  # a prefix of the name is not a parent directory
    ("/mnt/my disk/ckpt", "/mnt/my disk"),
    ("/home/user/outputs/ray", "/"),
])  # fmt: skip
def test_mount_of_longest_prefix(mounts: list[Mount], path: str, mount_point: str) -> None:
    assert mount_of(path, mounts).mount_point == mount_point


@pytest.mark.parametrize("fs_type, shared", [
    ("nfs", True), ("nfs4", True), ("cifs", True), ("smb3", True), ("lustre", True), ("gpfs", True),
    ("ceph", True), ("cephfs", True), ("glusterfs", True), ("beegfs", True), ("fuse.gcsfuse", True),
    ("fuse.s3fs", True), ("fuse.juicefs", True), ("fuse", True),
    ("ext4", False), ("xfs", False), ("btrfs", False), ("overlay", False), ("tmpfs", False), ("zfs", False),
    ("fuse.lxcfs", False), ("fuse-overlayfs", False),
])  # fmt: skip
def test_shared_fs_types(fs_type: str, shared: bool) -> None:
    assert is_shared_fs_type(fs_type) is shared


@pytest.mark.parametrize("path", ["/mnt/efs/elf/ray", "/mnt/nfs/x", "/mnt/smb/x", "/lustre/u/x", "/gpfs/x",
                                  "/mnt/ceph/x", "/mnt/gcs/x", "file:///mnt/efs/elf"])
def test_multi_node_accepts_shared_filesystems(mounts: list[Mount], path: str) -> None:
    report = check_storage_for_cluster(path, 4, mounts=mounts, environ={})
    assert report.storage == "shared filesystem" and report.mount.mount_point in path


@pytest.mark.parametrize("uri", ["s3://bucket/elf", "gs://bucket/elf", "abfs://container@acct.dfs.core.windows.net/x",
                                 "abfss://c@a.dfs.core.windows.net/x", "hdfs://namenode:8020/elf"])
def test_multi_node_accepts_object_stores(uri: str) -> None:
    # No mount table needed (and none is read): a remote URI never touches the local filesystem.
    report = check_storage_for_cluster(uri, 16, tracking_uri="http://mlflow.elf.svc:5000", environ={},
                                       mounts=[])
    assert (report.storage, report.tracking) == ("remote", "remote")


@pytest.mark.parametrize("path, why", [
    ("/home/user/outputs/ray", "'ext4' filesystem mounted at /"),
    ("/dev/shm/ray", "'tmpfs' filesystem mounted at /dev/shm"),
    ("/mnt/nfs/local-scratch/ray", "'xfs' filesystem mounted at /mnt/nfs/local-scratch"),
    ("file:///home/user/ray", "'ext4' filesystem mounted at /"),
])  # fmt: skip
def test_multi_node_refuses_node_local_paths(mounts: list[Mount], path: str, why: str) -> None:
    with pytest.raises(StorageNotShared) as e:
        check_storage_for_cluster(path, 2, mounts=mounts, environ={})
    msg = str(e.value)
    assert f"ray.storage_path='{path}' is node-local ({why})" in msg
    assert "2 Ray nodes" in msg and "s3://" in msg and "ELF_SHARED_STORAGE=1" in msg


def test_single_node_accepts_anything(mounts: list[Mount]) -> None:
    report = check_storage_for_cluster("/home/user/ray", 1, tracking_uri="sqlite:////tmp/m.db",
                                       mounts=mounts, environ={})
    assert report.num_nodes == 1 and "single node" in report.storage


@pytest.mark.parametrize("uri, why", [
    ("sqlite:////home/user/mlruns/mlflow.db", "SQLite file"),
    ("http://127.0.0.1:5000", "'127.0.0.1' is loopback"),
    ("http://localhost:5000", "'localhost' is loopback"),
    ("postgresql://mlflow:pw@localhost:5432/mlflow", "'localhost' is loopback"),
    ("file:///home/user/mlruns", "file store"),
])  # fmt: skip
def test_multi_node_refuses_node_local_tracking(mounts: list[Mount], uri: str, why: str) -> None:
    with pytest.raises(StorageNotShared) as e:
        check_storage_for_cluster("s3://b/elf", 3, tracking_uri=uri, mounts=mounts, environ={})
    msg = str(e.value)
    assert f"tracking.uri / MLFLOW_TRACKING_URI='{uri}' cannot be written from other nodes" in msg
    assert why in msg and "ray.storage_path" not in msg


@pytest.mark.parametrize("uri", ["http://mlflow.elf.svc.cluster.local:5000", "https://mlflow.example.com",
                                 "postgresql://mlflow:pw@db.internal:5432/mlflow", "databricks"])
def test_multi_node_accepts_remote_tracking(uri: str) -> None:
    assert check_storage_for_cluster("s3://b/x", 2, tracking_uri=uri, environ={}).tracking == "remote"


def test_both_problems_in_one_message(mounts: list[Mount]) -> None:
    with pytest.raises(StorageNotShared) as e:
        check_storage_for_cluster("/home/u/ray", 2, tracking_uri="sqlite:////home/u/m.db", mounts=mounts,
                                  environ={})
    assert "ray.storage_path='/home/u/ray'" in str(e.value) and "'sqlite:////home/u/m.db'" in str(e.value)


@pytest.mark.parametrize("value, accepted", [("1", True), ("true", True), ("YES", True), ("0", False), ("", False)])
def test_opt_in_env(mounts: list[Mount], value: str, accepted: bool) -> None:
    env = {"ELF_SHARED_STORAGE": value}
    if accepted:
        report = check_storage_for_cluster("/home/u/ray", 2, tracking_uri="http://127.0.0.1:5000", mounts=mounts,
                                           environ=env)
        assert (report.storage, report.tracking) == ("local (opted in)", "local (opted in)")
        assert "opted in" in report.summary()
    else:
        with pytest.raises(StorageNotShared):
            check_storage_for_cluster("/home/u/ray", 2, mounts=mounts, environ=env)


def test_nonexistent_path_is_judged_by_its_nearest_existing_parent(tmp_path: Path) -> None:
    # On this machine's real mount table: a path that does not exist yet lives where its parent is.
    real = read_mounts()
    deep = tmp_path / "not" / "yet" / "there"
    assert mount_of(deep, real) == mount_of(tmp_path, real)
    expected_shared = is_shared_fs_type(mount_of(tmp_path, real).fs_type)
    if expected_shared:
        assert check_storage_for_cluster(str(deep), 2, environ={}).storage == "shared filesystem"
    else:
        with pytest.raises(StorageNotShared):
            check_storage_for_cluster(str(deep), 2, environ={})


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="num_nodes must be >= 1"):
        check_storage_for_cluster("s3://b", 0, environ={})
    with pytest.raises(StorageNotShared, match="ray.storage_path is empty"):
        check_storage_for_cluster("", 2, environ={})


def _node(node_id: str, cpu: float, gpu: float = 0.0, alive: bool = True) -> dict:
    res = {"CPU": cpu, **({"GPU": gpu} if gpu else {})}
    return {"NodeID": node_id, "Alive": alive, "Resources": res}


@pytest.mark.parametrize("nodes, workers, cpus, gpus, client, expected", [
    ([_node("h", 16)], 2, 1, 0, False, 1),                            # laptop: all workers on the driver's node
    ([_node("h", 16)], 2, 16, 0, False, 2),                           # cannot all fit here -> other nodes
    ([_node("h", 0)], 16, 8, 1, False, 2),                            # bare autoscaling head, GPU workers
    ([_node("h", 8), _node("w", 192, 8)], 8, 8, 1, False, 2),        # head + one GPU node
    ([_node("h", 8), _node("w1", 192, 8), _node("w2", 192, 8), _node("dead", 8, alive=False)], 16, 8, 1, False, 3),
    ([_node("h", 64, 8)], 8, 8, 1, False, 1),                         # one 8-GPU box, driver on it
    ([_node("h", 64, 8)], 8, 8, 1, True, 2),                          # ... but reached through ray://
])  # fmt: skip
def test_count_nodes_for_run(nodes, workers, cpus, gpus, client, expected) -> None:
    assert count_nodes_for_run(nodes, "h", workers, cpus, gpus, ray_client=client) == expected
