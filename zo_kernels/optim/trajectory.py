"""Trajectory replay: a run is (θ0, seed, the list of calls); re-issuing the calls reproduces θ_T."""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

from ..hizoo import hizoo_update_
from ..ops import noise_axpy_
from ..restore import make_planes
from .base import _flatten_params
from .noise_form import GAUSSIAN, check_noise_form, noise_kw


def replay(params, log, *, backend: Optional[str] = None,
           progress: Optional[Callable[[int], None]] = None) -> None:
    """Re-issue a recorded trajectory (opt.trajectory) on `params`, in place.

    params: the optimizer's parameters in the same order (a list, the param groups, or an
    nn.Module whose .parameters() the optimizer was built from), holding the initial
    weights.  Every noise_axpy_ call that touched the weights is repeated with the same
    keys, coefficients, gamma, tensor ids, rounding key and noise form, so on the same backend the
    result is bit-identical to the recorded run.  HiZOO's runs also rebuild its σ (from 1) by re-issuing its
    update passes, whose scalars the log holds.  progress(i), if given, is called after entry i.
    """
    flat = _flatten_params(params)
    planes: Dict[tuple, list] = {}  # exact-restore residue planes, by the tensor ids they cover
    sigmas: Dict[int, torch.Tensor] = {}  # HiZOO's σ by tensor id: 1 at the start, rebuilt by its update passes
    for i, rec in enumerate(log):
        ids = [int(t) for t in rec["tensor_ids"]]
        if ids and max(ids) >= len(flat):
            raise ValueError(f"log entry {i} refers to tensor id {max(ids)} but only {len(flat)} params were given")
        ts = [flat[t] for t in ids]
        pl = None
        if rec.get("plane") == "write":
            pl = planes[tuple(ids)] = make_planes(ts, int(rec["plane_bits"]))
        elif rec.get("plane") == "read":
            if tuple(ids) not in planes:
                raise ValueError(f"log entry {i} reads residue planes that no earlier entry wrote")
            pl = planes[tuple(ids)]
        kw = dict(gamma=float(rec["gamma"]), rounding=rec.get("rounding", "nearest"), tensor_ids=ids,
                  rounding_key=int(rec["rounding_key"]), backend=backend, undo=rec.get("undo"), planes=pl,
                  **noise_kw(check_noise_form(rec.get("noise", GAUSSIAN))))
        sdt = getattr(torch, rec.get("sigma_dtype", "float32"))   # HiZOO(sigma_dtype=...); float32 when unnamed
        scale = [sigmas.setdefault(t, torch.ones(flat[t].shape, dtype=sdt, device=flat[t].device)) for t in ids]
        if rec.get("hizoo"):                # HiZOO's update pass (zo_kernels.hizoo): σ and θ
            hizoo_update_(ts, scale, int(rec["keys"][0]), coeff=float(rec["coeff"]), gamma=kw["gamma"],
                          smoothing=float(rec["smoothing"]), curvature=float(rec["curvature"]), rounding=kw["rounding"],
                          tensor_ids=ids, rounding_key=kw["rounding_key"], backend=backend,
                          noise=rec.get("noise", GAUSSIAN))
            if progress is not None:
                progress(i)
            continue
        keys, alphas = [int(k) for k in rec["keys"]], [float(a) for a in rec["alphas"]]
        if rec.get("scaled"):               # a HiZOO pass: scaled by σ (docs/spec.md §10)
            kw["scale"] = scale
        if rec.get("key_v") is not None:    # a low-rank pass (LOZO)
            from ..lowrank import lowrank_noise_axpy_
            lowrank_noise_axpy_(ts, keys, int(rec["key_v"]), alphas, rank=int(rec["rank"]), **kw)
        else:
            noise_axpy_(ts, keys, alphas, **kw)
        if progress is not None:
            progress(i)
