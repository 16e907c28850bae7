"""``train.compile=true``: the compiled network is not recompiled for every new row count.

The three passes of a step run on a varying number of rows (denoise rows, self-conditioning rows,
decode rows; :func:`elf_core.flow.flow_loss`). Over 20 real trainer steps whose branch row counts
vary (zero and one rows included), a counting ``aot_eager`` backend sees at most 3 graphs, and
every loss equals the uncompiled step's.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from torch._dynamo.backends.debugging import aot_eager

from elf_core.config import load_config
from elf_core.flow import StepNoise
from elf_core.network import ELFNetwork
from elf_core.trainer import ELFTrainer, noise_seed

sys.path.insert(0, str(Path(__file__).parent))
from test_parallel import OVERRIDES, D, V, _batch, _TableEncoder  # noqa: E402

STEPS = 20


class CountingBackend:
    """A dynamo backend that counts the graphs it is asked to compile, then runs them with aot_eager."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        self.graphs += 1
        return aot_eager(gm, example_inputs)


def _losses(compile_backend: CountingBackend | None, dynamic_rows: bool = True) -> list[float]:
    cfg = load_config(None, OVERRIDES + [f"train.compile={compile_backend is not None}"])
    torch.manual_seed(0)
    net = ELFNetwork(cfg.model, D, V)
    wrap = None if compile_backend is None else (lambda m: torch.compile(m, backend=compile_backend))
    trainer = ELFTrainer(cfg, net, _TableEncoder(), device=torch.device("cpu"), steps_per_epoch=100, wrap=wrap)
    trainer.cfg.train.compile = dynamic_rows and compile_backend is not None  # the flag flow_loss reads
    return [trainer.step(_batch(0, s))["loss"] for s in range(STEPS)]


def _row_counts() -> set[tuple[int, int, int]]:
    """(pass A rows, pass B rows, decode rows) of every micro-batch the 20 steps draw."""
    cfg = load_config(None, OVERRIDES)
    micro = 8 // cfg.train.grad_accum_steps
    seen = set()
    for step in range(STEPS):
        for i in range(cfg.train.grad_accum_steps):
            gen = torch.Generator().manual_seed(noise_seed(cfg.train.seed, 0, step, i))
            _, dec, sc = StepNoise.draw((micro, 12, D), cfg.flow, gen, "cpu").host_coins()
            seen.add((int((~dec).sum()), int((~dec & sc).sum()), int(dec.sum())))
    return seen


def test_compiled_step_has_bounded_graphs_and_exact_losses():
    counts = _row_counts()
    assert len({c[0] for c in counts}) >= 3 and len({c[2] for c in counts}) >= 3  # the counts really vary
    assert any(min(c) <= 1 for c in counts)  # including passes on 0 or 1 rows (dynamo specialises those)
    eager = _losses(None)
    torch._dynamo.reset()
    backend = CountingBackend()
    compiled = _losses(backend)
    # Measured: 3 (no-grad passes: a first graph that fills the RoPE cache, then the steady one;
    # the gradient pass). Without dynamic rows the same 20 steps compiled 6 graphs.
    assert backend.graphs <= 3
    assert np.allclose(compiled, eager, rtol=1e-6, atol=0)
    assert eager[0] != eager[-1]


def test_without_dynamic_rows_the_graph_count_grows():
    """The guard is not vacuous: the same steps without dynamic rows recompile more."""
    torch._dynamo.reset()
    backend = CountingBackend()
    _losses(backend, dynamic_rows=False)
    assert backend.graphs > 3
