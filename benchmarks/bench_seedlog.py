"""Seed-log size per 1,000 steps for every optimizer that records, and replay time against the
training time it replaces (docs/seedlog.md, "Measured").

    python benchmarks/bench_seedlog.py [--steps 1000] [--width 256]

A small MLP (the log's size does not depend on the tensors' sizes, only on their count and the
passes); the closure is a real forward pass on a fixed batch, so training time = forwards + passes
and replay time = passes.
"""
import argparse
import json
import time

import torch

from zo_kernels import optim
from zo_kernels.seedlog import Recorder, load_log, replay_log

OPTIMIZERS = {
    "mezo": lambda m: optim.MeZO(m.parameters(), lr=1e-3, record=True),
    "mezo (lookahead)": lambda m: optim.MeZO(m.parameters(), lr=1e-3, lookahead=True, record=True),
    "mezo-svrg (q 4)": lambda m: optim.MeZOSVRG(m.parameters(), lr=1e-3, lr_full=5e-3, q=4, record=True),
    "n-spsa (4 directions)": lambda m: optim.MeZO(m.parameters(), lr=4e-3, n_directions=4, record=True),
    "zo-sgd-sign": lambda m: optim.ZOSGDSign(m.parameters(), lr=5e-3, record=True),
    "zo-sgd-cons": lambda m: optim.ZOSGDCons(m.parameters(), lr=1e-3, record=True),
    "zo-sgd-mmt (seeded, window 32)": lambda m: optim.ZOSGDMomentum(m.parameters(), lr=1e-4, record=True),
    "lozo (rank 2, nu 10)": lambda m: optim.LOZO(m.parameters(), lr=5e-4, rank=2, nu=10, record=True),
    "forward-grad": lambda m: optim.ForwardGrad(m, lr=1e-3, record=True),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, a.width, generator=g), torch.randint(0, 2, (32,), generator=g)
    rows = []
    for name, make in OPTIMIZERS.items():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(a.width, a.width), torch.nn.Tanh(), torch.nn.Linear(a.width, 2))
        init = {k: v.clone() for k, v in net.state_dict().items()}
        opt = make(net)
        rec = Recorder(opt, net.named_parameters(), base={"name": "mlp"})

        def loss():
            return torch.nn.functional.cross_entropy(net(x), y)

        t0 = time.perf_counter()
        for _ in range(a.steps):
            if isinstance(opt, optim.MeZOSVRG):
                opt.step(loss, full_closure=loss if opt.is_full_step else None)
            else:
                opt.step(loss)
        train_s = time.perf_counter() - t0
        data = rec.encode()
        net.load_state_dict(init)
        log = load_log(data)
        t0 = time.perf_counter()
        replay_log(net.named_parameters(), log)
        replay_s = time.perf_counter() - t0
        rows.append({"optimizer": name, "steps": a.steps, "passes": len(log.records), "bytes": len(data),
                     "bytes_per_1000_steps": round(len(data) * 1000 / a.steps), "train_s": train_s,
                     "replay_s": replay_s})
        print(f"| {name} | {len(log.records) / a.steps:.1f} | {len(data) * 1000 / a.steps / 1024:.1f} KB | "
              f"{train_s:.2f} s | {replay_s:.2f} s |", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
