"""What is specific to the Triton kernel (under the interpreter on CPU, compiled on CUDA): block-size
independence and the unaligned-view path.  The backend contract it shares with the others is
tests/test_backend_conformance.py; its PTX is checked in tests/test_triton_aot.py."""
import pytest
import torch

import zo_kernels
from zo_kernels import noise as N

from backends_helpers import skip_unless
from helpers import exact_axpy
from native_helpers import assert_close_to_reference, make_tensor, run

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = skip_unless("triton", DEVICE)
KEYS = [N.step_key(11, s) for s in range(4)]


@pytest.mark.parametrize("block", [2, 16, 256])
def test_independent_of_block_size(block):
    from zo_kernels.triton import noise_axpy as tk

    base = make_tensor(1027, torch.float32, 3).to(DEVICE)
    outs = []
    for blk in (block, 1024):
        p = base.clone()
        tk.noise_axpy([p], [N.to_signed64(KEYS[1])], [0.25], 1.0, None, 0.0, "nearest", [4], [0], 0, block=blk)
        outs.append(p)
    assert torch.equal(outs[0], outs[1])


def test_unaligned_storage_offset_view():
    """A contiguous view whose data pointer is not 16-byte aligned takes the unaligned path correctly
    (in place on the view itself: a clone would be aligned again)."""
    buf = make_tensor(1030, torch.float32, 5).to(DEVICE)
    view = buf[1:1026]
    assert view.data_ptr() % 16 != 0
    kw = dict(keys=KEYS[:1], alphas=[0.5])
    before = view.cpu().clone()
    ref = run("reference", [view], **kw)[0]
    exact = exact_axpy([before], **kw)[0]
    zo_kernels.noise_axpy_([view], backend="triton", **kw)
    assert_close_to_reference(0, before, view.cpu(), ref.cpu(), exact, kw)
    assert torch.equal(buf[0].cpu(), make_tensor(1030, torch.float32, 5)[0])   # the neighbours untouched
    assert torch.equal(buf[1026:].cpu(), make_tensor(1030, torch.float32, 5)[1026:])
