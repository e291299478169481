"""Data-parallel and FSDP2-sharded ZO training on torch.distributed (CPU, gloo, 2 processes).

Each test starts 2 ranks with torch.multiprocessing.spawn on a free 127.0.0.1 port; every rank
saves what it saw to a file and the parent compares it with a single-process run of the same
seeds on the whole batch.
"""
from __future__ import annotations

import io
import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import zo_kernels.distributed as zdist
from zo_kernels import _fsdp
from zo_kernels.optim import LOZO, LOZOM, MeZO, MeZOSVRG, ZOAdam, ZOSGDMomentum

WORLD = 2
STEPS = 20
pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


# ------------------------------------------------------------------ harness
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, scenario, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        result = globals()[scenario](rank, world)
    except BaseException:
        result = {"worker_error": traceback.format_exc()}
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    # both ranks done before either tears down: a rank closing its gloo pairs while the other still
    # uses them aborted one CI run ("terminate called without an active exception", SIGABRT)
    dist.barrier()
    dist.destroy_process_group()


def _spawn(scenario, tmp_path):
    mp.spawn(_worker, args=(WORLD, _free_port(), scenario, str(tmp_path)), nprocs=WORLD, join=True)
    out = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for r, res in enumerate(out):
        assert "worker_error" not in res, f"rank {r} failed:\n{res['worker_error']}"
    return out


# ------------------------------------------------------------------ problems
class DLinear(torch.nn.Linear):
    """fp32 weights, float64 forward.  A batch's fp32 forward differs from its halves' in the last
    bit (BLAS blocking), and SPSA divides loss differences by 2μ = 2e-3, which would turn that into
    ~1e-5 weight differences; in float64 the comparison shows the reduction itself."""

    def forward(self, x):
        return torch.nn.functional.linear(x.double(), self.weight.double(), self.bias.double())


def _net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(DLinear(6, 7), torch.nn.Tanh(), DLinear(7, 5), torch.nn.Tanh(), DLinear(5, 1))


def _data(n=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randn(n, 1, generator=g)


def _batch(step, n=64):
    """Global batch of a step (the same on every rank): 7 indices."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randperm(n, generator=g)[:7].tolist()


def _split(idx, rank, step):
    """Unequal per-rank parts: 5 + 2 on even steps, 1 + 6 on odd steps."""
    cut = 5 if step % 2 == 0 else 1
    return idx[:cut] if rank == 0 else idx[cut:]


def _mean_loss(net, X, Y, idx):
    """Mean squared error over idx (float64)."""
    out = net(X[idx])
    return ((out - Y[idx].double()) ** 2).sum() / len(idx)


def _closure(net, X, Y, idx):
    return lambda: (_mean_loss(net, X, Y, idx), len(idx))


FULL = list(range(13))          # the "full batch" of MeZO-SVRG's full steps: 13 examples


def _make(kind, params, **kw):
    if kind == "mezo":
        return MeZO(params, lr=0.05, eps=1e-3, seed=7, **kw)
    if kind == "mezo-lookahead":
        return MeZO(params, lr=0.05, eps=1e-3, seed=7, lookahead=True, **kw)
    if kind in ("lozo", "lozo-m"):      # nu=3: V changes at steps 3, 6, 9 (LOZO-M carries M across)
        return (LOZO if kind == "lozo" else LOZOM)(params, lr=0.05, eps=1e-3, rank=2, nu=3, seed=7,
                                                   weight_decay=0.01, **kw)
    if kind == "mmt-dense":
        return ZOSGDMomentum(params, lr=0.02, eps=1e-3, seed=7, state="dense", **kw)
    if kind == "adam":
        return ZOAdam(params, lr=0.02, eps=1e-3, seed=7, n_directions=2, **kw)
    anchor = kind.split("-")[-1]
    return MeZOSVRG(params, lr=0.02, lr_full=0.05, eps=1e-3, q=3, seed=7, anchor=anchor, weight_decay=0.01, **kw)


def _train(kind, net, X, Y, rank=None, steps=STEPS, **kw):
    """`steps` steps; rank=None: one process on the whole batch; else this rank's part of it."""
    opt = _make(kind, list(net.parameters()), **kw)
    losses = []
    for t in range(steps):
        idx = _batch(t)
        part = idx if rank is None else _split(idx, rank, t)
        full = FULL if rank is None else (FULL[:9] if rank == 0 else FULL[9:])     # 9 + 4
        if isinstance(opt, MeZOSVRG):
            fc = _closure(net, X, Y, full) if opt.is_full_step else None
            losses.append(opt.step(_closure(net, X, Y, part), full_closure=fc))
        else:
            losses.append(opt.step(_closure(net, X, Y, part)))
    opt.settle()
    return opt, losses


KINDS = ["mezo", "mezo-lookahead", "svrg-dense", "svrg-replay"]


# ------------------------------------------------------------------ data parallel
def scen_data_parallel(rank, world):
    X, Y = _data()
    res = {}
    for kind in KINDS:
        net = _net()
        opt, losses = _train(kind, net, X, Y, rank=rank, distributed=True)
        res[kind] = {"weights": [p.detach().clone() for p in net.parameters()], "losses": losses,
                     "traj_len": opt.step_count}
    return res


def test_data_parallel_matches_single_process(tmp_path):
    out = _spawn("scen_data_parallel", tmp_path)
    X, Y = _data()
    for kind in KINDS:
        net = _net()
        _, losses = _train(kind, net, X, Y)
        ref = [p.detach() for p in net.parameters()]
        r0, r1 = out[0][kind], out[1][kind]
        # Identical on the two ranks: same update from the same all-reduced scalars, no weight traffic.
        for a, b in zip(r0["weights"], r1["weights"]):
            assert torch.equal(a, b), kind
        assert r0["losses"] == r1["losses"], kind
        # Equal to one process on the whole batch (unequal per-rank batches: 5+2, 1+6; full 9+4).
        for a, b in zip(r0["weights"], ref):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=lambda m: f"{kind}: {m}")
        assert r0["losses"] == pytest.approx(losses, rel=1e-9, abs=1e-12), kind
        # The run moved the weights.
        assert max((a - b).abs().max().item() for a, b in zip(ref, _net().parameters())) > 1e-3, kind


# ------------------------------------------------------------------ FSDP2
def _fsdp_net(seed=0, dtype=torch.float32):
    from torch.distributed.fsdp import fully_shard
    net = _net(seed).to(dtype)
    for i in (0, 2):
        fully_shard(net[i])
    fully_shard(net)            # owns net[4]; the root keeps its params unsharded after a no-grad forward
    return net


def _padding_views(net):
    """Per FSDP param: (local numel, the padded flat storage) -- to check the padding stays zero."""
    from torch.distributed.fsdp import FSDPModule
    out = []
    for m in net.modules():
        if not isinstance(m, FSDPModule):
            continue
        for pg in _fsdp.param_groups_of(_fsdp.state_of(m)):
            for fp in pg.fsdp_params:
                out.append((fp.sharded_param.to_local().numel(), fp._sharded_param_data))
    return out


def scen_fsdp(rank, world):
    import zo_kernels.optim.noise_path as base

    X, Y = _data()
    res = {}
    # 1. In-place changes to p.to_local() are what the next forward all-gathers, once the owning
    #    FSDP modules are resharded (the optimizer does that after every noise_axpy_).
    net = _fsdp_net()
    params = list(net.parameters())
    ref = _net()
    with torch.no_grad():
        y0 = net(X[:4])                     # lazy init; the root stays unsharded afterwards
        torch.testing.assert_close(y0, ref(X[:4]), rtol=0, atol=0)
        for p, q in zip(params, ref.parameters()):
            loc, off = zdist.local_shard(p)
            flat = q.view(-1)
            q.add_(torch.arange(q.numel(), dtype=q.dtype).view(q.shape) * 1e-2)
            loc.view(-1).copy_(flat[off:off + loc.numel()])
        stale = net(X[:4])
        for m in zdist.fsdp_modules_of(params):
            m.reshard()
        fresh = net(X[:4])
    res["inplace"] = (stale, fresh, ref(X[:4]))

    # 2. Sharded trajectories (with data parallelism: unequal per-rank batches) equal the unsharded run.
    for name, (kind, dtype, kw) in FSDP_CASES.items():
        net = _fsdp_net(dtype=dtype)
        params = list(net.parameters())
        touched = []
        real = base.noise_axpy_

        def counting(tensors, *a, **kw):
            assert not any(zdist.is_dtensor(t) for t in tensors)
            touched.append(sum(t.numel() for t in tensors))
            return real(tensors, *a, **kw)

        base.noise_axpy_ = counting
        try:
            opt, losses = _train(kind, net, X, Y, rank=rank, **kw)     # distributed=None: on for DTensors
        finally:
            base.noise_axpy_ = real
        local = sum(p.to_local().numel() for p in params)
        pads = _padding_views(net)
        res[name] = {"full": [p.full_tensor().detach().clone() for p in params], "losses": losses,
                     "local": local, "total": sum(p.numel() for p in params), "touched": touched,
                     "padding_zero": all(bool((flat[n:] == 0).all()) for n, flat in pads),
                     "padding_elems": sum(flat.numel() - n for n, flat in pads)}
    # 3. Optimizers with per-parameter tensor state (sharded like the parameter) and their state_dict.
    for name, (kind, dtype, kw) in FSDP_STATE_CASES.items():
        res[name] = _fsdp_state_case(kind, dtype, kw, X, Y, rank)
    # 4. Dense SVRG anchors cannot swap sharded storages: a clear error.
    try:
        _make("svrg-dense", list(_fsdp_net().parameters()))
        res["dense_error"] = None
    except ValueError as e:
        res["dense_error"] = str(e)
    return res


FSDP_CASES = {
    "mezo": ("mezo", torch.float32, {}),
    "mezo-lookahead": ("mezo-lookahead", torch.float32, {}),
    "svrg-replay": ("svrg-replay", torch.float32, {}),
    # bf16 shards: exact restore with residue planes at unaligned offsets (rank 1 of the 5x7
    # weight starts at element 21), stochastic rounding of the update from stream-2 bits.
    "mezo-bf16-sr": ("mezo", torch.bfloat16, {"rounding": "stochastic"}),
    "svrg-replay-bf16": ("svrg-replay", torch.bfloat16, {}),
}


# Tensor state: LOZO-M's U-space momentum (rows x r, rows sharded like the weight), dense momentum,
# Adam's m and v.  LOZO (no tensor state) rides along: its low-rank pass on shards.  Resumed from a
# state_dict at step STATE_RESUME (mid-period of LOZO's V: nu = 3).
STATE_STEPS, STATE_RESUME = 10, 7
FSDP_STATE_CASES = {
    "lozo": ("lozo", torch.float32, {}),
    "lozo-m": ("lozo-m", torch.float32, {}),
    "mmt-dense": ("mmt-dense", torch.float32, {}),
    "adam": ("adam", torch.float32, {}),
    # bf16: exact restore, LOZO-M's 1-D momenta in their own pass, stochastic rounding at shard offsets.
    "lozo-m-bf16-sr": ("lozo-m", torch.bfloat16, {"rounding": "stochastic"}),
    "adam-bf16-sr": ("adam", torch.bfloat16, {"rounding": "stochastic"}),
}


def _steps(opt, net, X, Y, rank, t0, t1):
    for t in range(t0, t1):
        opt.step(_closure(net, X, Y, _split(_batch(t), rank, t)))


def _fsdp_state_case(kind, dtype, kw, X, Y, rank):
    """STATE_STEPS sharded steps; the state_dict saved (torch.save) at STATE_RESUME is loaded into a
    fresh sharded model and optimizer, which runs the remaining steps."""
    net = _fsdp_net(dtype=dtype)
    params = list(net.parameters())
    opt = _make(kind, params, **kw)
    _steps(opt, net, X, Y, rank, 0, STATE_RESUME)
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "shards": [p.to_local().detach().clone() for p in params]}, buf)
    _steps(opt, net, X, Y, rank, STATE_RESUME, STATE_STEPS)
    out = {"full": [p.full_tensor().detach().clone() for p in params],
           "state": [{k: v.full_tensor() for k, v in opt.state[p].items() if torch.is_tensor(v)} for p in params],
           # each state tensor a DTensor placed like its parameter (same mesh, placements, dim 0)
           "state_placed": all(zdist.is_dtensor(v) and v.device_mesh == p.device_mesh
                               and v.placements == p.placements and v.shape[0] == p.shape[0]
                               for p in params for v in opt.state[p].values() if torch.is_tensor(v))}
    buf.seek(0)
    ck = torch.load(buf, weights_only=False)
    net2 = _fsdp_net(seed=5, dtype=dtype)                   # other weights, overwritten from the checkpoint
    params2 = list(net2.parameters())
    with torch.no_grad():
        for p, shard in zip(params2, ck["shards"]):
            p.to_local().copy_(shard)
    opt2 = _make(kind, params2, **kw)
    # State that is not sharded like its parameter (here: a local tensor) is refused before anything loads.
    bad = {**ck["opt"], "state": {i: {k: v.to_local() if torch.is_tensor(v) else v for k, v in st.items()}
                                  for i, st in ck["opt"]["state"].items()}}
    try:
        opt2.load_state_dict(bad)
        out["plain_state_error"] = None
    except ValueError as e:
        out["plain_state_error"] = (str(e), len(opt2.state), opt2.step_count)
    opt2.load_state_dict(ck["opt"])
    _steps(opt2, net2, X, Y, rank, STATE_RESUME, STATE_STEPS)
    out["resumed"] = [p.full_tensor().detach().clone() for p in params2]
    return out


def test_fsdp2_sharded_matches_unsharded(tmp_path):
    out = _spawn("scen_fsdp", tmp_path)
    X, Y = _data()
    for r in range(WORLD):
        stale, fresh, want = out[r]["inplace"]
        torch.testing.assert_close(fresh, want, rtol=0, atol=1e-6)
        assert not torch.allclose(stale, want)      # FSDP2's root keeps stale gathered weights until resharded
        assert "replay" in out[r]["dense_error"]
    for name, (kind, dtype, kw) in FSDP_CASES.items():
        net = _net().to(dtype)
        _, losses = _train(kind, net, X, Y, **kw)
        ref = [p.detach() for p in net.parameters()]
        r0, r1 = out[0][name], out[1][name]
        for a, b, c in zip(r0["full"], r1["full"], ref):
            assert torch.equal(a, b), name
            # The noise (and the stochastic-rounding bits) of a shard is that slice of the whole
            # tensor's: the sharded run is the unsharded one (bit-identical here; allow fp32 round-off).
            torch.testing.assert_close(a, c, rtol=0, atol=1e-6, msg=lambda m: f"{name}: {m}")
        assert r0["losses"] == pytest.approx(losses, rel=1e-9, abs=1e-12), name
        # Each rank touched only its shard: every op call covered exactly its local elements,
        # and the padding of uneven shards stayed zero.
        total = r0["total"]
        assert r0["local"] + r1["local"] == total
        for res in (r0, r1):
            assert res["touched"] and all(n == res["local"] for n in res["touched"]), name
        # Memory: each rank holds its torch.chunk rows of every tensor (ceil(rows/2) on rank 0), no more.
        shapes = [p.shape for p in _net().parameters()]
        for r, res in enumerate((r0, r1)):
            rows = [-(-s[0] // WORLD) if r == 0 else s[0] - -(-s[0] // WORLD) for s in shapes]
            want = sum(n * (s.numel() // s[0]) for n, s in zip(rows, shapes))
            assert res["local"] == want, (r, res["local"], want)
            assert res["padding_zero"], name
        assert r0["padding_elems"] + r1["padding_elems"] > 0     # the test has uneven shards (4+3, 3+2, 1+0)
    start = [p.detach() for p in _net().parameters()]
    for name, (kind, dtype, kw) in FSDP_STATE_CASES.items():
        net = _net().to(dtype)
        opt, _ = _train(kind, net, X, Y, steps=STATE_STEPS, **kw)
        ref = [p.detach() for p in net.parameters()]
        r0, r1 = out[0][name], out[1][name]
        for a, b, c in zip(r0["full"], r1["full"], ref):
            assert torch.equal(a, b), name
            torch.testing.assert_close(a, c, rtol=0, atol=1e-6, msg=lambda m: f"{name}: {m}")
        assert max((a.float() - d).abs().max().item() for a, d in zip(ref, start)) > 1e-3, name    # it moved
        # Each rank kept the state of its shard: gathered, it is the unsharded run's state.
        want = [{k: v for k, v in opt.state[p].items() if torch.is_tensor(v)} for p in net.parameters()]
        assert any(want) == (kind != "lozo"), name
        for res in (r0, r1):
            assert res["state_placed"], name
            for got_p, want_p in zip(res["state"], want):
                assert got_p.keys() == want_p.keys(), name
                for k in want_p:
                    torch.testing.assert_close(got_p[k], want_p[k], rtol=1e-6, atol=1e-6,
                                               msg=lambda m: f"{name} {k}: {m}")
            if kind != "lozo":
                err, n_loaded, step = res["plain_state_error"]
                assert "plain tensor" in err and "DTensor" in err and n_loaded == 0 and step == 0, name
            # The state_dict round trip (torch.save of the DTensor state) resumes bit-identically.
            for a, b in zip(res["resumed"], res["full"]):
                assert torch.equal(a, b), name


# ------------------------------------------------------------------ the guard
def scen_guard(rank, world):
    X, Y = _data()
    res = {}

    def first_step(**kw):
        net = _net(kw.pop("net_seed", 0))
        opt = MeZO(list(net.parameters()), lr=0.05, distributed=True, **kw)
        before = [p.detach().clone() for p in net.parameters()]
        try:
            opt.step(_closure(net, X, Y, _split(_batch(0), rank, 0)))
            err = None
        except zdist.RankMismatchError as e:
            err = str(e)
        same = all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
        return err, same

    res["seed"] = first_step(seed=1 + rank)                      # ranks disagree on the base seed
    res["weights"] = first_step(net_seed=rank)                   # different initial weights
    net = _net()
    opt = MeZO(list(net.parameters()), lr=0.05, seed=3, distributed=True)
    opt._t = rank                                                 # as if resumed from different steps
    try:
        opt.step(_closure(net, X, Y, _split(_batch(0), rank, 0)))
        res["step"] = None
    except zdist.RankMismatchError as e:
        res["step"] = str(e)
    res["ok"] = first_step(seed=5)                               # agreeing ranks: no error

    # Ranks that drift apart after the first step (one rank changes its learning rate).
    net = _net()
    opt = MeZO(list(net.parameters()), lr=0.05, seed=3, distributed=True)
    opt.step(_closure(net, X, Y, _split(_batch(0), rank, 0)))
    if rank == 1:
        opt.param_groups[0]["lr"] = 0.1
    try:
        opt.step(_closure(net, X, Y, _split(_batch(1), rank, 1)))
        res["drift"] = None
    except zdist.RankMismatchError as e:
        res["drift"] = str(e)

    # A closure that raises on one rank: every rank raises (nobody hangs), weights restored.
    net = _net()
    opt = MeZO(list(net.parameters()), lr=0.05, seed=3, distributed=True)
    before = [p.detach().clone() for p in net.parameters()]

    def bad():
        if rank == 1:
            raise KeyError("boom")
        return _mean_loss(net, X, Y, [0, 1])

    try:
        opt.step(bad)
        res["fail"] = None
    except (KeyError, zdist.RankFailedError) as e:
        res["fail"] = type(e).__name__
    res["fail_restored"] = all(torch.allclose(a, b, atol=1e-6) for a, b in zip(before, net.parameters()))
    res["fail_step"] = opt.step_count
    opt.step(_closure(net, X, Y, _split(_batch(0), rank, 0)))   # the next step works on every rank
    res["after_fail"] = [p.detach().clone() for p in net.parameters()]
    return res


def test_guard_mismatched_ranks_raise_on_every_rank(tmp_path):
    out = _spawn("scen_guard", tmp_path)
    for r, res in enumerate(out):
        err, same = res["seed"]
        assert err is not None and "seed" in err and "rank 0: 1" in err and "rank 1: 2" in err, err
        assert same, "the weights must not move when the ranks disagree"
        err, same = res["weights"]
        assert err is not None and "weights differ" in err and same
        assert res["step"] is not None and "step" in res["step"]
        assert res["ok"] == (None, False)
        assert res["drift"] is not None and "drifted" in res["drift"] and "lr" in res["drift"]
        assert res["fail"] == ("KeyError" if r == 1 else "RankFailedError")
        assert res["fail_restored"] and res["fail_step"] == 0
    for a, b in zip(out[0]["after_fail"], out[1]["after_fail"]):
        assert torch.equal(a, b)


# ------------------------------------------------------------------ single-process helpers
def test_helpers_without_torchrun(monkeypatch):
    for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(v, raising=False)
    assert zdist.init_from_env() is False and not zdist.is_initialized()
    assert zdist.get_rank() == 0 and zdist.get_world_size() == 1 and zdist.is_main_process()
    assert zdist.local_device("cpu") == "cpu"
    parts = [zdist.shard_range(10, r, 3) for r in range(3)]
    assert [list(p) for p in parts] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert zdist.shard_list("abcde", 1, 2) == ["d", "e"]
    with pytest.raises(RuntimeError, match="init_from_env"):
        MeZO(_net().parameters(), lr=0.1, distributed=True)
    # A closure may return (mean loss, count) without distributed too: the count is ignored.
    X, Y = _data()
    a, b = _net(), _net()
    oa, ob = MeZO(a.parameters(), lr=0.05, seed=2), MeZO(b.parameters(), lr=0.05, seed=2)
    for t in range(3):
        oa.step(lambda: _mean_loss(a, X, Y, _batch(t)))
        ob.step(_closure(b, X, Y, _batch(t)))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    with pytest.raises(ValueError, match="count"):
        oa.step(lambda: (_mean_loss(a, X, Y, [0]), -1))
    # Offsets of non-dim-0 shards are refused; dim-0 and leading-1 shards are flat ranges.
    assert zdist._flat_offset((7, 3), (3, 3), (4, 0)) == 12
    assert zdist._flat_offset((1, 8), (1, 4), (0, 4)) == 4
    with pytest.raises(NotImplementedError, match="contiguous"):
        zdist._flat_offset((2, 8), (2, 4), (0, 4))
