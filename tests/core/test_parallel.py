"""DDP vs FSDP2 (elf_core.parallel) on 2 real gloo ranks: the same ELF training steps (Muon + Adam,
gradient accumulation, EMA) give the same losses and weights; an FSDP2 checkpoint is unsharded,
resumes exactly under FSDP2 and loads into DDP and into a single process."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from elf_core.checkpoint import load_checkpoint, save_checkpoint
from elf_core.config import load_config
from elf_core.network import ELFNetwork
from elf_core.optim import build_optimizer
from elf_core.parallel import gather_full_state, is_dtensor, is_sharded, shard_like, wrap_for_training
from elf_core.trainer import ELFTrainer

D, V, B, S = 16, 50, 8, 12
OVERRIDES = ["model.preset=tiny", "model.hidden_size=64", "model.bottleneck_dim=32",
             "optim.adam_params=[unembed_kernel]", "train.grad_accum_steps=2", "optim.ema_decay=0.9"]


class _TableEncoder(torch.nn.Module):
    """A frozen embedding table standing in for the text encoder (the flow only needs latents)."""

    dim = D

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.emb = torch.nn.Embedding(V, D)

    @torch.no_grad()
    def encode(self, ids, mask):
        return self.emb(ids)


def _batch(rank: int, step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)  # each rank its own data, as in training
    ids = torch.randint(0, V, (B, S), generator=g)
    return dict(input_ids=ids, cond_mask=torch.zeros(B, S, dtype=torch.bool), loss_mask=torch.ones(B, S),
                encoder_mask=torch.ones(B, S, S, dtype=torch.bool), attention_mask=torch.ones(B, S))


def _trainer(strategy: str, rank: int, world: int) -> ELFTrainer:
    cfg = load_config(None, OVERRIDES)
    torch.manual_seed(0)
    net = ELFNetwork(cfg.model, D, V)
    dev = torch.device("cpu")
    return ELFTrainer(cfg, net, _TableEncoder(), device=dev, steps_per_epoch=100, rank=rank, world_size=world,
                      wrap=lambda m: wrap_for_training(m, strategy=strategy, world_size=world, device=dev))


def _worker(rank: int, world: int, port: int, strategy: str, steps: int, out: str, save_at: int, resume: str) -> None:
    """One rank: optionally resume from ``resume``, train to ``steps``, checkpoint at ``save_at``,
    write rank 0's losses and full weights to ``out``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        tr = _trainer(strategy, rank, world)
        assert is_sharded(tr.net) == (strategy == "fsdp2")
        if resume:
            ck = load_checkpoint(resume, model=tr.net, optimizer=tr.optimizer, scheduler=tr.scheduler)
            tr.ema.load_state_dict(ck.ema_state)
            tr.step_count = ck.step
        losses = []
        while tr.step_count < steps:
            losses.append(tr.step(_batch(rank, tr.step_count))["loss"])
            if tr.step_count == save_at:
                full = gather_full_state(tr.net, rank=rank, optimizer=tr.optimizer, ema=tr.ema)
                if rank == 0:
                    save_checkpoint(Path(out).with_suffix(".ckpt"), model=tr.net, config=tr.cfg, ema_state=full.ema,
                                    optimizer=tr.optimizer, scheduler=tr.scheduler, step=tr.step_count,
                                    model_state=full.model, optimizer_state=full.optimizer)
                else:  # what rank 1 holds after the save's gather: nothing at all
                    torch.save({"gathered": full}, Path(out).with_suffix(".rank1"))
        full = gather_full_state(tr.net, rank=rank, ema=tr.ema)
        if rank == 0:
            assert all(type(t) is torch.Tensor and t.device.type == "cpu" for t in full.model.values())
            torch.save({"losses": losses, "weights": full.model, "ema": full.ema,
                        "live_is_dtensor": any(is_dtensor(p) for p in tr.net.parameters())}, out)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(tmp_path: Path, tag: str, strategy: str, steps: int, save_at: int = -1, resume: str = "") -> dict:
    out = str(tmp_path / f"{tag}.pt")
    mp.start_processes(_worker, args=(2, _free_port(), strategy, steps, out, save_at, resume), nprocs=2,
                       start_method="spawn")
    return torch.load(out)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parallel")
    return tmp, {"ddp": _run(tmp, "ddp", "ddp", 4), "fsdp2": _run(tmp, "fsdp2", "fsdp2", 4, save_at=2)}


def test_fsdp2_matches_ddp(runs):
    _, r = runs
    ddp, fsdp = r["ddp"], r["fsdp2"]
    assert len(ddp["losses"]) == len(fsdp["losses"]) == 4
    assert ddp["losses"] == pytest.approx(fsdp["losses"], rel=1e-5)
    assert ddp["losses"][0] != ddp["losses"][-1]  # the weights really moved
    # Same update up to float summation order (reduce-scatter vs all-reduce): measured 1.2e-7.
    assert _max_diff(ddp["weights"], fsdp["weights"]) < 1e-5
    assert _max_diff(ddp["ema"], fsdp["ema"]) < 1e-5


def test_fsdp2_save_gathers_the_full_state_to_rank0_only(runs):
    tmp, r = runs
    assert r["fsdp2"]["live_is_dtensor"]  # the ranks trained on shards...
    assert torch.load(tmp / "fsdp2.rank1")["gathered"] is None  # ...and rank 1 kept no full copy of anything
    # rank 0's gathered optimizer state is the id-keyed form optimizer.state_dict() has
    saved = load_checkpoint(tmp / "fsdp2.ckpt").optimizer_state
    assert sorted(saved["state"]) == list(range(len(saved["state"])))
    assert [i for g in saved["param_groups"] for i in g["params"]] == sorted(saved["state"])


def test_fsdp2_checkpoint_is_full_and_resumes_exactly(runs):
    tmp, r = runs
    ckpt = tmp / "fsdp2.ckpt"
    plain = load_checkpoint(ckpt)  # one process, no process group: the file holds full tensors
    ref = ELFNetwork(plain.config.model, D, V)
    assert {k: tuple(v.shape) for k, v in plain.model.state_dict().items()} == \
           {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert plain.step == 2 and plain.ema_state is not None
    # Optimizer state is unsharded too: each saved Muon buffer is a plain tensor of its full parameter's shape.
    opt = build_optimizer(ref, plain.config.optim, 1e-3)
    params = [p for g in opt.param_groups for p in g["params"]]
    saved = plain.optimizer_state["state"]
    muon = [i for i, p in enumerate(params) if "momentum_buffer" in saved[i]]
    assert len(muon) > 4
    for i in muon:
        assert type(saved[i]["momentum_buffer"]) is torch.Tensor
        assert saved[i]["momentum_buffer"].shape == params[i].shape

    resumed = _run(tmp, "fsdp2-resumed", "fsdp2", 4, resume=str(ckpt))
    assert resumed["losses"] == r["fsdp2"]["losses"][2:]  # bit-exact continuation
    assert _max_diff(resumed["weights"], r["fsdp2"]["weights"]) == 0.0
    assert _max_diff(resumed["ema"], r["fsdp2"]["ema"]) == 0.0

    into_ddp = _run(tmp, "ddp-from-fsdp2", "ddp", 4, resume=str(ckpt))
    assert into_ddp["losses"] == pytest.approx(r["fsdp2"]["losses"][2:], rel=1e-5)
    assert _max_diff(into_ddp["weights"], r["ddp"]["weights"]) < 1e-5


def test_wrap_rejects_unknown_strategy():
    net = ELFNetwork(load_config(None, OVERRIDES).model, D, V)
    with pytest.raises(ValueError, match="ray.strategy='zero3'"):
        wrap_for_training(net, strategy="zero3", world_size=2, device=torch.device("cpu"))


def test_shard_like_without_process_group_is_a_plain_copy():
    like = torch.zeros(3, 4, dtype=torch.float64)
    full = torch.arange(12.0).view(3, 4)
    out = shard_like(full, like)
    assert out.dtype == torch.float64 and torch.equal(out, full.double())
