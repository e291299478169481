"""Shared pieces of the kernel tests (test_backend_conformance.py and the per-backend files):
seeded inputs, the 16-bit grid position, a call on a named backend, the comparison with the
reference, and the peak-RSS check for temporaries."""
import os
import subprocess
import sys

import torch

import zo_kernels

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
