"""Bad input is refused with an error naming the problem, before any weight is touched."""
import math
import warnings

import pytest
import torch

import zo_kernels
from zo_kernels import backends

from backends_helpers import backends_on

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _params():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(10, generator=g).to(DEVICE), torch.randn(3, 4, generator=g).to(DEVICE)]


BAD = [
    ("empty", lambda p: ([], [1], [1.0]), {}, ValueError, "empty"),
    ("non-contiguous", lambda p: ([p[0], p[1].t()], [1], [1.0]), {}, ValueError, r"params\[1\] is not contiguous"),
    ("integer tensor", lambda p: ([p[0], torch.ones(3, dtype=torch.int64, device=DEVICE)], [1], [1.0]), {},
     TypeError, r"params\[1\].*int64"),
    ("not a tensor", lambda p: ([p[0], [1.0, 2.0]], [1], [1.0]), {}, TypeError, r"params\[1\] must be a torch.Tensor"),
    ("keys/alphas length", lambda p: (p, [1, 2], [1.0]), {}, ValueError, "len\\(keys\\)=2 but len\\(alphas\\)=1"),
    ("key too large", lambda p: (p, [2**64], [1.0]), {}, ValueError, r"keys\[0\].*64 bits"),
    ("key too negative", lambda p: (p, [-(2**63) - 1], [1.0]), {}, ValueError, "64 bits"),
    ("float key", lambda p: (p, [1.5], [1.0]), {}, TypeError, r"keys\[0\] must be an int"),
    ("nan alpha", lambda p: (p, [1], [math.nan]), {}, ValueError, r"alphas\[0\] is nan"),
    ("inf gamma", lambda p: (p, [1], [1.0]), {"gamma": math.inf}, ValueError, "gamma is inf"),
    ("bad rounding", lambda p: (p, [1], [1.0]), {"rounding": "up"}, ValueError, "rounding"),
    ("dense count", lambda p: (p, [1], [1.0]), {"dense": [torch.zeros(10, device=DEVICE)]}, ValueError,
     "dense has 1 tensors for 2 params"),
    ("dense shape", lambda p: (p, [1], [1.0]), {"dense": [torch.zeros(10, device=DEVICE), torch.zeros(12, device=DEVICE)]},
     ValueError, r"dense\[1\] has shape"),
    ("tensor id range", lambda p: (p, [1], [1.0]), {"tensor_ids": [0, 2**32]}, ValueError, r"tensor_ids\[1\]"),
    ("negative offset", lambda p: (p, [1], [1.0]), {"offsets": [0, -4]}, ValueError, r"offsets\[1\]"),
    ("aliased", lambda p: ([p[0], p[0]], [1], [1.0]), {}, ValueError, "share memory"),
    ("unknown backend", lambda p: (p, [1], [1.0]), {"backend": "fpga"}, ValueError, "unknown backend"),
    ("unknown noise", lambda p: (p, [1], [1.0]), {"noise": "uniform"}, ValueError, "noise.*'uniform'"),
    ("noise not a str", lambda p: (p, [1], [1.0]), {"noise": 1}, ValueError, "noise must be one of"),
    ("unknown noise, exact form", lambda p: (p, [1], [1.0]), {"noise": "sign", "undo": [0.0]}, ValueError,
     "noise.*'sign'"),
]


@pytest.mark.parametrize("name,make,kw,exc,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_and_leaves_weights_untouched(name, make, kw, exc, match):
    p = _params()
    before = [t.clone() for t in p]
    args = make(p)
    with pytest.raises(exc, match=match):
        zo_kernels.noise_axpy_(*args, **kw)
    for a, b in zip(p, before):
        assert torch.equal(a, b)


def test_non_leaf_requiring_grad_is_refused():
    leaf = torch.randn(5, requires_grad=True)
    nonleaf = leaf * 2
    with pytest.raises(ValueError, match="non-leaf"):
        zo_kernels.noise_axpy_([nonleaf], [1], [1.0])


def test_leaf_parameter_requiring_grad_is_fine():
    w = torch.nn.Parameter(torch.zeros(8))
    zo_kernels.noise_axpy_([w], [1], [1.0], backend="reference")
    assert w.abs().sum() > 0 and w.is_leaf


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs two devices")
def test_mixed_devices_refused():
    with pytest.raises(ValueError, match="share a device"):
        zo_kernels.noise_axpy_([torch.zeros(3), torch.zeros(3, device="cuda")], [1], [1.0])


def test_mixed_devices_dense_refused_on_meta():
    with pytest.raises(ValueError, match="share a device"):
        zo_kernels.noise_axpy_([torch.zeros(3)], [1], [1.0], dense=[torch.zeros(3, device="meta")])


def test_unsigned_and_signed_key_forms_agree():
    a, b = torch.zeros(16), torch.zeros(16)
    k = 2**64 - 5
    zo_kernels.noise_axpy_([a], [k], [1.0], backend="reference")
    zo_kernels.noise_axpy_([b], [k - 2**64], [1.0], backend="reference")
    assert torch.equal(a, b)


def test_env_var_forces_backend(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    zo_kernels.noise_axpy_([torch.zeros(4)], [1], [1.0])
    assert zo_kernels.last_backend() == "reference"
    monkeypatch.setenv(backends.ENV_VAR, "nonexistent")
    with pytest.raises(ValueError, match="unknown backend"):
        zo_kernels.noise_axpy_([torch.zeros(4)], [1], [1.0])


def test_requesting_an_unavailable_backend_says_why():
    name = next((n for n, why in zo_kernels.backend_status().items() if why), None)
    if name is None:
        pytest.skip("every backend is available here")
    with pytest.raises(RuntimeError, match="unavailable"):
        zo_kernels.noise_axpy_([torch.zeros(4)], [1], [1.0], backend=name)


def test_fallback_is_announced_once(monkeypatch):
    """When the preferred backend is missing, the registry warns once and says which runs."""
    monkeypatch.setattr(backends, "PREFERENCE", {"cpu": ("ghost", "reference"), "cuda": ("ghost", "reference")})
    monkeypatch.setattr(backends, "_WARNED", set())
    with pytest.warns(RuntimeWarning, match="'ghost' is unavailable"):
        zo_kernels.noise_axpy_([torch.zeros(4, device=DEVICE)], [1], [1.0])
    assert zo_kernels.last_backend() == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        zo_kernels.noise_axpy_([torch.zeros(4, device=DEVICE)], [1], [1.0])


def test_available_backends_lists_reference():
    assert "reference" in zo_kernels.available_backends()
    assert set(zo_kernels.available_backends()) <= set(zo_kernels.backend_status())


def test_float64_uses_reference_by_default():
    zo_kernels.noise_axpy_([torch.zeros(4, dtype=torch.float64)], [1], [1.0])
    assert zo_kernels.last_backend() == "reference"


def test_empty_tensor_in_list_is_fine():
    p = [torch.zeros(0), torch.zeros(5)]
    zo_kernels.noise_axpy_(p, [1], [1.0])
    assert p[1].abs().sum() > 0


# ------------------------------------------------ issue 12: overlap, inference tensors, strict types
def _untouched(call, exc, match, *tensors):
    before = [t.clone() for t in tensors]
    with pytest.raises(exc, match=match):
        call()
    for t, b in zip(tensors, before):
        assert torch.equal(t, b)


def test_overlapping_views_are_refused_naming_both():
    base = torch.randn(24)
    _untouched(lambda: zo_kernels.noise_axpy_([base[0:12], base[6:18]], [1], [1.0]), ValueError,
               r"params\[0\] and params\[1\] share memory", base)
    _untouched(lambda: zo_kernels.noise_axpy_([base, base[3:7]], [1], [1.0]), ValueError,
               r"params\[0\] and params\[1\] share memory", base)
    # a view of another dtype over the same bytes overlaps too
    _untouched(lambda: zo_kernels.noise_axpy_([base[12:], base[6:18].view(torch.bfloat16)], [1], [1.0]),
               ValueError, r"params\[1\] and params\[0\] share memory", base)
    zo_kernels.noise_axpy_([base[0:12], base[12:24]], [1], [1.0])      # adjacent views are fine


@pytest.mark.parametrize("backend", backends_on("cpu"))
def test_dense_overlapping_a_param_is_refused(backend):
    base = torch.randn(65)
    p, d = base[:64], base[1:]
    _untouched(lambda: zo_kernels.noise_axpy_([p], [1], [1.0], dense=[d], beta=0.5, backend=backend), ValueError,
               r"params\[0\] and dense\[0\] share memory", base)
    other = torch.randn(64)
    # dense[i] may be params[i] itself, not params[j]
    a, b = torch.randn(64), torch.randn(64)
    _untouched(lambda: zo_kernels.noise_axpy_([a, b], [1], [1.0], dense=[b, a], beta=0.5, backend=backend),
               ValueError, "share memory", a, b)
    zo_kernels.noise_axpy_([a, b], [1], [1.0], dense=[a, b], beta=0.5, backend=backend)
    # dense terms may overlap each other: they are only read
    q = torch.randn(64)
    zo_kernels.noise_axpy_([other, q], [1], [1.0], dense=[base[:64], base[1:]], beta=0.5, backend=backend)


def test_planes_overlapping_a_param_are_refused():
    p = torch.randn(16).bfloat16()
    _untouched(lambda: zo_kernels.noise_axpy_([p], [1], [0.5], undo=[0.0], planes=[p.view(torch.uint8)[:4]],
                                              backend="reference"),
               ValueError, r"params\[0\] and planes\[0\] share memory", p)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inference_tensor_refused_before_anything_is_written(dtype):
    p = torch.randn(8, dtype=dtype)
    with torch.inference_mode():
        q = torch.randn(8, dtype=dtype)
    _untouched(lambda: zo_kernels.noise_axpy_([p, q], [1], [1.0]), RuntimeError, r"params\[1\] is an inference tensor",
               p, q)
    with torch.inference_mode():       # inside inference mode torch allows it, and so do we
        zo_kernels.noise_axpy_([q], [1], [1.0])


def test_sparse_tensor_named_as_sparse():
    s = torch.zeros(6)
    s[1] = 1.0
    with pytest.raises(TypeError, match=r"params\[0\] is a torch.sparse_coo tensor"):
        zo_kernels.noise_axpy_([s.to_sparse()], [1], [1.0])


@pytest.mark.parametrize("kw,exc,match", [
    ({"tensor_ids": [0.5, 1.7]}, TypeError, r"tensor_ids\[0\] must be an int"),
    ({"offsets": [0, 2.0]}, TypeError, r"offsets\[1\] must be an int"),
    ({"tensor_ids": [True, 1]}, TypeError, r"tensor_ids\[0\] must be an int"),
    ({"gamma": 1e39}, ValueError, "gamma=1e\\+39 exceeds the float32 range"),
    ({"beta": -1e39}, ValueError, "beta=-1e\\+39 exceeds"),
    ({"gamma": "1.0"}, TypeError, "gamma must be a real number"),
])
def test_strict_scalars_and_ids(kw, exc, match):
    p = _params()
    _untouched(lambda: zo_kernels.noise_axpy_(p, [1], [1.0], **kw), exc, match, *p)


@pytest.mark.parametrize("alphas,match", [(["0.5"], "alphas\\[0\\] must be a real number, got str"),
                                          ([True], "alphas\\[0\\] must be a real number, got bool"),
                                          ([1e39], "alphas\\[0\\]=1e\\+39 exceeds")])
def test_alphas_must_be_real_numbers(alphas, match):
    p = _params()
    _untouched(lambda: zo_kernels.noise_axpy_(p, [1], alphas), (TypeError, ValueError), match, *p)


def test_float64_keeps_its_range_and_refuses_the_exact_form():
    p = torch.randn(8, dtype=torch.float64)
    zo_kernels.noise_axpy_([p], [1], [1e39])               # computed in float64: representable
    assert torch.isfinite(p).all()
    _untouched(lambda: zo_kernels.noise_axpy_([p], [1], [1.0], undo=[0.0], backend="reference"), TypeError,
               "exact-restore form.*float64", p)


def test_adam_states_overlapping_each_other_are_refused():
    """noise_adam_ writes θ, m and v: a partial overlap between them (not just the same data_ptr) is refused."""
    from zo_kernels.adam import noise_adam_

    p = torch.randn(16)
    buf = torch.zeros(33)
    m, v = buf[:16], buf[8:24]
    _untouched(lambda: noise_adam_([p], [m], [v], [1], [1.0], lr=1e-3, step=1, backend="reference"), ValueError,
               r"exp_avgs\[0\] and exp_avg_sqs\[0\] share memory", p, buf)


def test_unknown_noise_form_of_noise_and_adam_is_one_line_value_error():
    out = torch.zeros(8, device=DEVICE)
    with pytest.raises(ValueError, match="noise must be one of .*'gaussian', 'rademacher'.*got 'Rademacher'"):
        zo_kernels.noise_(out, 1, noise="Rademacher")
    p = _params()
    before = [t.clone() for t in p]
    m = [torch.zeros_like(t) for t in p]
    with pytest.raises(ValueError, match="got 'bernoulli'"):
        zo_kernels.noise_adam_(p, m, [t.clone() for t in m], [1], [1.0], lr=0.1, step=1, noise="bernoulli")
    assert all(torch.equal(a, b) for a, b in zip(p, before)) and not any(t.any() for t in m)


def test_backend_without_a_noise_form_names_it_and_the_form(monkeypatch):
    """A backend lacking a form refuses it (never a silent Gaussian fallback), naming backend and form."""
    b = backends.get("reference")
    monkeypatch.setattr(b, "noise_forms", frozenset({"gaussian"}))
    p = _params()
    before = [t.clone() for t in p]
    with pytest.raises(NotImplementedError, match="backend 'reference' does not implement noise='rademacher'"):
        zo_kernels.noise_axpy_(p, [1], [1.0], noise="rademacher", backend="reference")
    assert all(torch.equal(a, c) for a, c in zip(p, before))
