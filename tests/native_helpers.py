"""Shared pieces of the kernel tests (test_backend_conformance.py and the per-backend files):
seeded inputs, the 16-bit grid position, a call on a named backend, the comparison with the
reference, the ±1 workload the native backends must agree on bit for bit, and the peak-RSS check for
temporaries."""
import os
import subprocess
import sys

import torch

import zo_kernels
from zo_kernels import noise as N
from zo_kernels import restore as R

from helpers import exact_axpy, z_bound


def make_tensor(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (shape,) if isinstance(shape, int) else shape
    return torch.randn(shape, generator=g).to(dtype)


def ordered(x):
    """Position of each 16-bit float on its grid (consecutive representable values differ by 1)."""
    b = x.contiguous().view(torch.int16).to(torch.int64)
    return torch.where(b < 0, -(b & 0x7FFF), b)


def assert_close_to_reference(i, param, f, r, e, kw):
    """Tensor i of a noise_axpy_ call with arguments kw: the kernel's result f against the reference's
    r and the float64 e.  fp32: error vs float64 within 2x the reference's plus the spec's z bound.
    bf16/fp16: at most one ulp from the reference (the two fp32 sums may fall on either side of a
    rounding tie)."""
    if param.dtype == torch.float32:
        tid = i if kw.get("tensor_ids") is None else kw["tensor_ids"][i]
        off = 0 if kw.get("offsets") is None else kw["offsets"][i]
        f, r, e = f.double().reshape(-1), r.double().reshape(-1), e.reshape(-1)
        bound = z_bound(kw["keys"], kw["alphas"], tid, f.numel(), off)
        ref_err = (r - e).abs().max().item()
        assert (f - e).abs().max().item() <= 2 * ref_err + bound.max().item() + 1e-12, f"tensor {i}"
    else:
        dist = (ordered(f) - ordered(r)).abs().max().item()
        assert dist <= 1, f"tensor {i}: {dist} ulps from the reference"


def run(backend, params, **kw):
    """noise_axpy_ on clones of `params`, asserting that `backend` ran it."""
    params = [p.clone() for p in params]
    zo_kernels.noise_axpy_(params, backend=backend, **kw)
    assert zo_kernels.last_backend() == backend
    return params


def check_against_reference(backend, params, **kw):
    """One call on `backend` against the reference and the float64 evaluation (assert_close_to_reference)."""
    got = run(backend, params, **kw)
    ref = run("reference", params, **kw)
    cpu = [p.cpu() for p in params]
    dense = None if kw.get("dense") is None else [d.cpu() for d in kw["dense"]]
    exact = exact_axpy(cpu, kw["keys"], kw["alphas"], kw.get("gamma", 1.0), dense, kw.get("beta", 0.0),
                       kw.get("tensor_ids"), kw.get("offsets"))
    for i, (f, r, e) in enumerate(zip(got, ref, exact)):
        assert f.shape == params[i].shape and f.dtype == params[i].dtype
        assert_close_to_reference(i, cpu[i], f.cpu(), r.cpu(), e, kw)


def rademacher_workload(backend, device="cpu"):
    """Every op with noise="rademacher" (docs/spec.md §9) on `backend` with tensors on `device`, the
    results as CPU tensors: offsets that split sign blocks anywhere, more keys than the CPU kernel keeps
    sign blocks for (10 > 8 slots), a dense term, stochastic rounding, the exact form with planes, noise_,
    noise_adam_.  Sizes span several CPU threads' shares and GPU programs."""
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    keys = [N.step_key(6, s) for s in range(10)]
    alphas = [0.01 * (j + 1) * (-1) ** j for j in range(10)]
    on = dict(backend=backend, noise="rademacher")

    def tensors(sizes, seed, scale=1.0, dtype=None):
        return [(make_tensor(s, torch.float32, seed + i) * scale).to(dtype or dtypes[i % 3]).to(device)
                for i, s in enumerate(sizes)]

    sizes = [1 << 16, 4097, 3, (64, 333)]
    params, dense = tensors(sizes, 0), tensors(sizes, 20, dtype=torch.float32)
    kw = dict(keys=keys[:2], alphas=alphas[:2], gamma=0.999, dense=dense, beta=1e-3, rounding="stochastic",
              rounding_key=123, offsets=[0, 127, 130, 64], **on)
    out = []
    for call in (kw, dict(kw, keys=keys, alphas=alphas, offsets=[3, 2**33 + 125, 1, 0])):
        out += [p.clone() for p in params]
        zo_kernels.noise_axpy_(out[-len(params):], **call)
    ps = tensors((4097, 1 << 16, 5), 40, 0.02)
    offs = [61, 2**35 + 3, 0]
    planes = R.make_planes(ps, 4, offsets=offs)
    zo_kernels.noise_axpy_(ps, keys[:3], alphas[:3], offsets=offs, planes=planes, **on)
    zo_kernels.noise_axpy_(ps, keys[:3], alphas[3:6], undo=alphas[:3], gamma=0.99, rounding="stochastic",
                           offsets=offs, planes=planes, **on)
    out += ps + planes
    out.append(zo_kernels.noise_(torch.empty(70001, device=device), keys[0], 1, 3, **on))
    ps = tensors((1 << 15, 4097, 3), 60)
    ms = [t * 0.1 for t in tensors([p.shape for p in ps], 9, dtype=torch.float32)]
    vs = [t.abs() * 0.1 for t in tensors([p.shape for p in ps], 19, dtype=torch.float32)]
    zo_kernels.noise_adam_(ps, ms, vs, keys, alphas, lr=1e-3, step=3, weight_decay=0.1, offsets=[5, 128, 2**40 + 1],
                           rounding="stochastic", **on)
    return [t.cpu() for t in out + ps + ms + vs]


# hwm(): the process's peak resident set (VmHWM) in bytes, for the scripts below
_HWM = '''
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
'''


def assert_no_temporaries(script):
    """Run `script` (which may call hwm() and prints "<peak RSS growth> <tensor bytes>") in a fresh
    interpreter with two threads; the growth must stay under 5% of the tensor."""
    env = dict(os.environ, OMP_NUM_THREADS="2")
    out = subprocess.run([sys.executable, "-c", _HWM + script], capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    growth, size = map(int, out.stdout.split()[-2:])
    assert growth < 0.05 * size, f"peak RSS grew by {growth / 2**20:.1f} MiB on a {size / 2**20:.0f} MiB tensor"
