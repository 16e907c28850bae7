"""A worker's bad-input error reaches the user as one line (pipelines.training.driver.elf_error_in),
built from Ray's own exception classes the way Ray Train 2.60 wraps them: ``WorkerGroupError`` ->
rank -> ``RayTaskError`` whose ``cause`` is the worker's exception."""

from __future__ import annotations

import ray.exceptions
from ray.train import WorkerGroupError

from elf_core.errors import ElfError
from pipelines.training.driver import elf_error_in


def _as_raised_on_a_worker(error: Exception) -> Exception:
    try:
        raise error
    except Exception as e:  # noqa: BLE001 - what Ray does to any exception in a remote task
        return ray.exceptions.RayTaskError("train_fn", "Traceback ...", e).as_instanceof_cause()


def test_an_elf_error_on_a_worker_is_found_unwrapped():
    wrapped = _as_raised_on_a_worker(ElfError("data.source='x.jsonl': line 3 is not JSON"))
    assert isinstance(wrapped, ElfError) and isinstance(wrapped, ray.exceptions.RayTaskError)
    failed = WorkerGroupError("rank 1 failed", {0: _as_raised_on_a_worker(RuntimeError("peer gone")), 1: wrapped})
    found = elf_error_in(failed)
    assert type(found) is ElfError and str(found) == "data.source='x.jsonl': line 3 is not JSON"


def test_a_crash_is_not_bad_input():
    failed = WorkerGroupError("rank 0 failed", {0: _as_raised_on_a_worker(RuntimeError("CUDA error: out of memory"))})
    assert elf_error_in(failed) is None
    chained = RuntimeError("outer")
    chained.__cause__ = ElfError("inner")
    assert str(elf_error_in(chained)) == "inner"
