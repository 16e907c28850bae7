"""Tests for pipelines.infra.ray_env: env defaults, runtime_env merging, worker packing arithmetic, and — on
the session's real local Ray (integration) — loopback binding, worker env and the resource check."""

from __future__ import annotations

import json
import sys
import time

import pytest

from pipelines.infra import ray_env as re_


# ---- no Ray needed ------------------------------------------------------------------------------
def test_local_env_values_and_user_override():
    assert re_.LOCAL_RAY_ENV == {
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
    }
    env = {"RAY_AUTH_MODE": "token", "OTHER": "x"}
    applied = re_.apply_local_ray_env(env)
    assert applied["RAY_AUTH_MODE"] == "token"  # the user's choice wins
    assert env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0" and env["OTHER"] == "x"
    assert applied == {**re_.LOCAL_RAY_ENV, "RAY_AUTH_MODE": "token"}


def test_worker_runtime_env_merges_with_a_submitted_job(monkeypatch):
    from ray.runtime_env.runtime_env import _merge_runtime_env  # what ray.init does inside a job

    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert re_.worker_runtime_env({"MLFLOW_TRACKING_URI": "sqlite:////a.db"}) == {
        "env_vars": {
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
            "TQDM_MININTERVAL": re_.WORKER_ENV["TQDM_MININTERVAL"],  # "5" unless the user set their own
            "MLFLOW_TRACKING_URI": "sqlite:////a.db",
        }
    }
    # `ray job submit --runtime-env-json` already set one of our keys: Ray refuses duplicates
    # (merge returns None), so we leave that key to the submitter.
    submitted = {"working_dir": "/x", "env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "1"}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": submitted}))
    ours = re_.worker_runtime_env()
    assert ours == {"env_vars": {"MLFLOW_DISABLE_TELEMETRY": "true", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
                                 "TQDM_MININTERVAL": re_.WORKER_ENV["TQDM_MININTERVAL"]}}
    assert _merge_runtime_env(submitted, {"env_vars": dict(re_.WORKER_ENV)}) is None
    merged = _merge_runtime_env(submitted, ours)
    assert merged["env_vars"] == {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
                                  "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
                                  "TQDM_MININTERVAL": re_.WORKER_ENV["TQDM_MININTERVAL"]}


def test_workers_that_fit_packs_per_node():
    nodes = [{"CPU": 8.0, "GPU": 2.0}, {"CPU": 4.0, "GPU": 4.0}]
    # Totals (12 CPU, 6 GPU) would suggest 6 workers of (2 CPU, 1 GPU); per node: min(4,2)+min(2,4).
    assert re_.workers_that_fit(nodes, 2, 1) == 4
    assert re_.workers_that_fit(nodes, 1, 0) == 12
    assert re_.workers_that_fit([{"CPU": 3.0}], 0.5, 0) == 6
    assert re_.workers_that_fit([{"CPU": 1.0}, {"CPU": 1.0}], 0.3, 0) == 6  # floor(1/0.3)=3 per node
    assert re_.workers_that_fit([{"CPU": 64.0}], 1, 1) == 0  # no GPU anywhere
    assert re_.workers_that_fit([], 1, 0) == 0


def test_init_ray_validates_before_starting_anything(monkeypatch, tmp_path):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # reach the check even mid-session
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("ray.init must not be called"))
    with pytest.raises(ValueError, match="num_cpus must be >= 1, got 0"):
        re_.init_ray(address="local", num_cpus=0, temp_dir=tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_default_num_cpus_leaves_room_for_controller_and_workers():
    assert re_.default_num_cpus() >= 4


# ---- the session's local Ray (integration) ------------------------------------------------------
@pytest.fixture(scope="module")
def by_value():
    """Functions/classes of a test module are pickled by reference, and Ray workers cannot import
    test modules (stack-notes trap: ``No module named 'test_x'``); ship this module's by value."""
    from ray import cloudpickle  # Ray vendors its own copy; the standalone one is not used

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def _remote_env(keys: list[str]) -> dict[str, str | None]:
    import os

    return {k: os.environ.get(k) for k in keys}


class _Holder:
    def ping(self) -> str:
        return "pong"


@pytest.mark.integration
def test_local_ray_is_contained_and_workers_get_the_env(ray_local, by_value):
    import ray

    s = ray_local.session
    assert s.local and not s.reused
    assert s.address.startswith("127.0.0.1:"), s.address  # loopback, not the eth0 address
    assert s.temp_dir == ray_local.temp_dir
    assert s.resources["CPU"] == 6.0
    assert s.resources["object_store_memory"] == 512 * 1024 * 1024
    assert all(n["NodeManagerAddress"] == "127.0.0.1" for n in ray.nodes())
    keys = [*re_.WORKER_ENV, "RAY_AUTH_MODE"]
    seen = ray.get(ray.remote(num_cpus=1)(_remote_env).remote(keys))
    assert seen == {**re_.WORKER_ENV, "RAY_AUTH_MODE": "disabled"}


@pytest.mark.integration
def test_init_ray_reuses_a_running_instance(ray_local):
    t0 = time.monotonic()
    again = re_.init_ray(address="local", num_cpus=99)
    assert time.monotonic() - t0 < 2
    assert again.reused and again.resources["CPU"] == 6.0


@pytest.mark.integration
def test_check_cluster_fits_against_real_ray(ray_local):
    t0 = time.monotonic()
    totals = re_.check_cluster_fits(6, cpus_per_worker=1)
    assert totals["CPU"] == 6.0
    assert re_.check_cluster_fits(12, cpus_per_worker=0.5)["CPU"] == 6.0
    with pytest.raises(re_.ClusterTooSmall) as info:
        re_.check_cluster_fits(7, cpus_per_worker=1, hint="lower train.num_workers")
    assert str(info.value) == (
        "asked for 7 workers × 1 CPU (7 CPUs in all) but the Ray cluster has 0 GPUs / 6 CPUs "
        "(1 node: 6 CPUs, 0 GPUs); at most 6 such workers fit. The job would wait forever for "
        "resources: lower train.num_workers."
    )
    with pytest.raises(re_.ClusterTooSmall, match=r"^asked for 8 workers × 1 CPU \+ 1 GPU \(8 CPUs, 8 GPUs in all\) "
                       r"but the Ray cluster has 0 GPUs / 6 CPUs .*at most 0 such workers fit"):  # fmt: skip
        re_.check_cluster_fits(8, cpus_per_worker=1, gpus_per_worker=1)
    assert time.monotonic() - t0 < 5  # an answer, not a wait for resources
    with pytest.raises(ValueError, match="num_workers must be >= 1"):
        re_.check_cluster_fits(0)


@pytest.mark.integration
def test_held_cpus_are_detected(ray_local, by_value):
    """The autouse guard's probe: an actor holding CPUs is seen; once it is gone, nothing is."""
    import ray
    from conftest import ray_cpus_held_after

    actor = ray.remote(num_cpus=2)(_Holder).remote()
    assert ray.get(actor.ping.remote()) == "pong"
    assert ray_cpus_held_after(0.5) == (2.0, 6.0)
    ray.kill(actor)
    assert ray_cpus_held_after(15)[0] == 0.0
