"""ZO-Bench's family data parallel (gloo, 2 processes): unequal per-rank batches give the same weights
on both ranks and the same weights as one process on the whole batch (harness and problem of
tests/test_distributed.py)."""
from __future__ import annotations

import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_distributed import STEPS, WORLD, _batch, _closure, _data, _free_port, _net, _split

from zo_kernels.optim import ZOAdam, ZOSGDCons, ZOSGDMomentum, ZOSGDSign

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
KINDS = ["sign", "cons", "mmt-seeded", "mmt-dense", "adam"]


def _make(kind, params, **kw):
    base = dict(lr=0.02, eps=1e-3, seed=7, **kw)
    if kind == "sign":
        return ZOSGDSign(params, n_directions=2, **base)
    if kind == "cons":
        return ZOSGDCons(params, **base)
    if kind.startswith("mmt"):
        return ZOSGDMomentum(params, state=kind.split("-")[1], window=5, **base)
    return ZOAdam(params, **base)


def _train(kind, rank=None, **kw):
    X, Y = _data()
    net = _net()
    opt = _make(kind, list(net.parameters()), **kw)
    for t in range(STEPS):
        idx = _batch(t)
        opt.step(_closure(net, X, Y, idx if rank is None else _split(idx, rank, t)))
    return [p.detach().clone() for p in net.parameters()]


def _worker(rank, world, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        result = {kind: _train(kind, rank, distributed=True) for kind in KINDS}
    except BaseException:
        result = {"worker_error": traceback.format_exc()}
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_zo_bench_data_parallel_matches_single_process(tmp_path):
    mp.spawn(_worker, args=(WORLD, _free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    out = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for r, res in enumerate(out):
        assert "worker_error" not in res, f"rank {r} failed:\n{res['worker_error']}"
    start = [p.detach() for p in _net().parameters()]
    for kind in KINDS:
        ref = _train(kind)
        for a, b in zip(out[0][kind], out[1][kind]):
            assert torch.equal(a, b), kind
        for a, b in zip(out[0][kind], ref):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=lambda m: f"{kind}: {m}")
        assert max((a - b).abs().max().item() for a, b in zip(ref, start)) > 1e-3, kind
