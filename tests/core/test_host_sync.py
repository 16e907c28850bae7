"""No host↔device synchronisation inside a training step or the sampling loop.

On CPU nothing truly synchronises, so the calls that *would* block on a GPU are counted instead:
every aten op that reads device data back to the host (``_local_scalar_dense`` — behind
``.item()``, ``float()``, ``int()``, ``bool()`` —, ``nonzero``, ``masked_select``, ``equal``,
``unique``…, and indexing with a boolean mask, whose output size needs the mask's count), seen by
a ``TorchDispatchMode`` so that calls made inside C++ are caught too, plus the Python-level
``Tensor.tolist`` and ``Tensor.cpu``.
``Tensor.numpy()`` is not counted: it raises on a device tensor, so it can only touch host
memory (the branch coins are drawn there).
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from elf_core.config import FlowConfig, SampleConfig, load_config
from elf_core.network import ELFNetwork
from elf_core.sampling import sample_latents
from elf_core.trainer import ELFTrainer, StepMetrics

sys.path.insert(0, str(Path(__file__).parent))
from test_parallel import OVERRIDES, D, V, _batch, _TableEncoder  # noqa: E402

aten = torch.ops.aten
SYNC_OPS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
            aten.equal.default, aten.is_nonzero.default, aten._unique2.default, aten.unique_dim.default,
            aten.unique_consecutive.default, aten.nonzero_numpy.default}
INDEX_OPS = {aten.index.Tensor, aten.index_put_.default, aten.index_put.default}


class SyncCounter(TorchDispatchMode):
    """Counts host-reading calls (module docstring) while active."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()
        self._patched: list[tuple[str, object]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SYNC_OPS:
            self.calls[str(func)] += 1
        elif func in INDEX_OPS and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]):
            self.calls["boolean-mask indexing"] += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        for name in ("tolist", "cpu"):
            original = getattr(torch.Tensor, name)
            self._patched.append((name, original))

            def counted(t, *a, _name=name, _original=original, **kw):
                self.calls[f"Tensor.{_name}"] += 1
                return _original(t, *a, **kw)

            setattr(torch.Tensor, name, counted)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._patched:
            setattr(torch.Tensor, name, original)
        self._patched.clear()
        return super().__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.calls.values())


def _trainer(extra: list[str] = ()) -> ELFTrainer:
    cfg = load_config(None, OVERRIDES + list(extra))
    torch.manual_seed(0)
    net = ELFNetwork(cfg.model, D, V)
    from elf_core.flops import model_flops
    return ELFTrainer(cfg, net, _TableEncoder(), device=torch.device("cpu"), steps_per_epoch=100,
                      model_flops=model_flops(cfg.model, D, V, 12))


def _counter_sees_a_sync() -> None:
    """The counter is not blind: the old row selection (``mask.nonzero()``), boolean-mask
    indexing, ``float(t)`` and ``tolist()`` are all counted."""
    with SyncCounter() as c:
        m = torch.tensor([True, False, True])
        m.nonzero()
        torch.arange(3)[m]
        float(torch.ones(()))
        torch.ones(2).tolist()
    assert c.calls[str(aten.nonzero.default)] == 1 and c.calls["boolean-mask indexing"] == 1
    assert c.calls[str(aten._local_scalar_dense.default)] == 1
    assert c.calls["Tensor.tolist"] == 1


@pytest.mark.parametrize("extra", [[], ["flow.label_drop_prob=0.5", "train.grad_accum_steps=1"]])
def test_step_without_sync_makes_no_host_reads(extra):
    _counter_sees_a_sync()
    trainer = _trainer(extra)
    trainer.step(_batch(0, 0))  # warm-up: first-call caches (RoPE tables, optimizer state)
    with SyncCounter() as c:
        pending = trainer.step(_batch(0, 1), sync=False)
    assert isinstance(pending, StepMetrics)
    assert c.total == 0, c.calls
    with SyncCounter() as c:
        metrics = pending.materialize()
    assert dict(c.calls) == {"Tensor.tolist": 1}  # the one device->host copy
    assert metrics["loss"] > 0 and metrics["grad_norm"] > 0 and metrics["flops"] > 0
    assert pending.materialize() is metrics  # idempotent, no second read


def test_step_with_latents_makes_no_host_reads():
    trainer = _trainer(["flow.label_drop_prob=0.5"])
    batch = _batch(0, 1)
    batch["latents"] = _TableEncoder().encode(batch["input_ids"], batch["encoder_mask"]).half()
    trainer.step(_batch(0, 0))
    with SyncCounter() as c:
        trainer.step(batch, sync=False)
    assert c.total == 0, c.calls


def test_deferred_metrics_equal_synced_metrics():
    """``sync=False`` then ``materialize()`` gives the same numbers as ``step(batch)``; materialising
    only every k-th step reports the mean wall time per step over the interval."""
    a, b = _trainer(), _trainer()
    pending = []
    for s in range(4):
        synced = a.step(_batch(0, s))
        pending.append(b.step(_batch(0, s), sync=False))
        deferred = pending[-1].materialize() if s % 2 == 1 else None
        if deferred is not None:
            assert {k: v for k, v in deferred.items() if k != "step_time_s"} == \
                   {k: v for k, v in synced.items() if k != "step_time_s"}
            assert deferred["step_time_s"] > 0
    assert pending[0]._values is None  # never materialised: never read back


def test_synced_step_reads_back_once():
    trainer = _trainer()
    trainer.step(_batch(0, 0))
    with SyncCounter() as c:
        trainer.step(_batch(0, 1))
    assert dict(c.calls) == {"Tensor.tolist": 1}


@pytest.mark.parametrize("sampler,gamma,reads", [("ode", 0.0, 0), ("sde", 0.0, 0), ("sde", 1.5, 1)])
def test_sampling_loop_reads_the_host_at_most_once_per_batch(sampler, gamma, reads):
    torch.manual_seed(0)
    net = ELFNetwork(load_config(overrides=["model.preset=tiny"]).model, D, V).eval()
    cfg = SampleConfig(sampler=sampler, steps=6, gamma=gamma)
    with SyncCounter() as c:
        sample_latents(net, (2, 12, D), cfg, FlowConfig(), torch.Generator().manual_seed(0))
    assert c.total == reads, c.calls  # SDE: one (steps,) read of which intervals inject noise


class ArgmaxCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.argmax = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.argmax += func is aten.argmax.default
        return func(*args, **(kwargs or {}))


def test_steps_without_metrics_train_identically_and_skip_the_argmax():
    """``step(metrics=False)`` (the worker's unlogged steps) gives the same weights bit for bit,
    never runs the decode-accuracy argmax, and refuses to be materialised; the next logged step's
    metrics equal those of a trainer that computed metrics every step."""
    a, b = _trainer(), _trainer()
    for s in range(3):
        a.step(_batch(0, s), sync=False)
        with ArgmaxCounter() as c:
            skipped = b.step(_batch(0, s), sync=False, metrics=False)
        assert c.argmax == 0
        with pytest.raises(ValueError, match="metrics=False"):
            skipped.materialize()
    with ArgmaxCounter() as c:
        logged_b = b.step(_batch(0, 3), sync=False).materialize()
    assert c.argmax >= 1
    logged_a = a.step(_batch(0, 3), sync=False).materialize()
    for (name, pa), pb in zip(a.net.named_parameters(), b.net.parameters()):
        assert torch.equal(pa, pb), name
    assert {k: v for k, v in logged_a.items() if k != "step_time_s"} == \
           {k: v for k, v in logged_b.items() if k != "step_time_s"}
    with pytest.raises(ValueError, match="sync=True, metrics=False"):
        b.step(_batch(0, 4), metrics=False)
