"""Seed logs (zo_kernels.seedlog, docs/seedlog.md): every recording optimizer round-trips through a
.zolog to the weights it trained (compared tensor by tensor with the trained ones), on every CPU
instruction set; damaged, truncated, unknown-version and wrong-base logs are refused with one line
and nothing written; zo-finetune --save-log -> zo-replay in fresh processes at 1 and 2 threads."""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from zo_kernels import backends, optim
from zo_kernels.native import cpu_isas, on_isa
from zo_kernels.seedlog import Recorder, SeedLogError, load_log, replay_log, weights_sha256
from zo_kernels.seedlog import format as fmt

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _net(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(dtype)


# name -> (optimizer factory on a module, dtype)
OPTIMIZERS = {
    "mezo": (lambda m: optim.MeZO(m.parameters(), lr=1e-2, record=True), torch.float32),
    "mezo-lookahead": (lambda m: optim.MeZO(m.parameters(), lr=1e-2, lookahead=True, record=True), torch.float32),
    "mezo-bf16-exact-stochastic": (lambda m: optim.MeZO(m.parameters(), lr=1e-2, rounding="stochastic", record=True),
                                   torch.bfloat16),
    "n-spsa": (lambda m: optim.MeZO(m.parameters(), lr=1e-2, n_directions=3, weight_decay=0.1, record=True),
               torch.float32),
    "svrg-dense": (lambda m: optim.MeZOSVRG(m.parameters(), lr=1e-2, lr_full=2e-2, q=2, record=True), torch.float32),
    "svrg-replay": (lambda m: optim.MeZOSVRG(m.parameters(), lr=1e-2, lr_full=2e-2, q=2, anchor="replay",
                                             record=True), torch.float32),
    "zo-sgd-sign": (lambda m: optim.ZOSGDSign(m.parameters(), lr=1e-3, record=True), torch.float32),
    "zo-sgd-cons": (lambda m: optim.ZOSGDCons(m.parameters(), lr=1e-2, record=True), torch.float32),
    "zo-sgd-mmt-seeded": (lambda m: optim.ZOSGDMomentum(m.parameters(), lr=1e-2, state="seeded", window=4,
                                                        record=True), torch.float32),
    "lozo": (lambda m: optim.LOZO(m.parameters(), lr=1e-2, rank=2, nu=3, record=True), torch.float32),
    "lozo-bf16": (lambda m: optim.LOZO(m.parameters(), lr=1e-2, rank=2, nu=3, record=True), torch.bfloat16),
    "forward-grad": (lambda m: optim.ForwardGrad(m, lr=1e-2, record=True), torch.float32),
    "fzoo-gaussian": (lambda m: optim.FZOO(m.parameters(), lr=1e-2, n_directions=3, noise="gaussian", record=True),
                      torch.float32),
    "mezo-lezo": (lambda m: optim.MeZO(m.parameters(), lr=1e-2, layer_fraction=0.5, record=True), torch.float32),
}
# The ±1 form on the CPU backend (docs/spec.md §9): its passes carry the noise form in the log.
_PM1 = {
    "fzoo": (lambda m: optim.FZOO(m.parameters(), lr=1e-2, n_directions=3, record=True), torch.float32),
    "mezo-rademacher": (lambda m: optim.MeZO(m.parameters(), lr=1e-2, noise="rademacher", record=True),
                        torch.float32),
    "fzoo-bf16-exact": (lambda m: optim.FZOO(m.parameters(), lr=1e-2, n_directions=3, record=True), torch.bfloat16),
}
OPTIMIZERS.update(_PM1)
_CPU_PM1 = "rademacher" in backends.get("cpu").noise_forms if "cpu" in backends.available_backends() else False
STEPS = 7


def _train(name):
    """(module at θ_0 copy, trained module, log bytes): STEPS steps of `name` on a fixed batch."""
    make, dtype = OPTIMIZERS[name]
    net = _net(dtype)
    init = {k: v.clone() for k, v in net.state_dict().items()}
    opt = make(net)
    rec = Recorder(opt, net.named_parameters(), base={"name": "toy"})
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 12, generator=g).to(dtype), torch.randint(0, 3, (16,), generator=g)

    def loss():
        return torch.nn.functional.cross_entropy(net(x).float(), y)

    for _ in range(STEPS):
        if isinstance(opt, optim.MeZOSVRG):
            opt.step(loss, full_closure=loss if opt.is_full_step else None)
        else:
            opt.step(loss)
    data = rec.encode()
    fresh = _net(dtype)
    fresh.load_state_dict(init)
    return fresh, net, data, opt


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.skipif(
    n in _PM1 and not _CPU_PM1, reason="the CPU backend of this build has no noise='rademacher'")) for n in sorted(OPTIMIZERS)])
def test_round_trip_every_recording_optimizer(name):
    fresh, trained, data, opt = _train(name)
    log = load_log(data)
    assert log.records == opt.trajectory
    assert log.header["steps"] == STEPS and log.header["optimizer"]["class"] == type(opt).__name__
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    for isa in cpu_isas():
        fresh.load_state_dict(before)
        with on_isa(isa):
            sha = replay_log(fresh.named_parameters(), log)
        for (n, p), q in zip(fresh.named_parameters(), trained.parameters()):
            assert torch.equal(p.view(torch.uint8) if p.dtype == torch.bfloat16 else p,
                               q.view(torch.uint8) if q.dtype == torch.bfloat16 else q), (isa, n)
        assert sha == weights_sha256(trained.parameters())


@pytest.mark.parametrize("cls", ["ZOAdam", "LOZOM"])
def test_optimizers_with_dense_state_cannot_be_logged(cls):
    net = _net()
    with pytest.raises(ValueError, match="record"):
        getattr(optim, cls)(net.parameters(), lr=1e-3, record=True)
    with pytest.raises(SeedLogError, match="record=True"):
        Recorder(getattr(optim, cls)(net.parameters(), lr=1e-3), net.named_parameters(), base={})


def test_size_is_a_few_bytes_per_mezo_step():
    """A MeZO step adds one key (a step key: not stored) and one update coefficient (8 bytes)."""
    net = _net()
    opt = optim.MeZO(net.parameters(), lr=1e-3, record=True)
    rec = Recorder(opt, net.named_parameters(), base={"name": "toy"})
    x, y = torch.randn(16, 12), torch.randint(0, 3, (16,))
    for _ in range(400):
        opt.step(lambda: torch.nn.functional.cross_entropy(net(x), y))
    assert len(opt.trajectory) == 3 * 400
    assert len(rec.encode()) < 400 * 12 + 1000


def test_the_noise_form_of_each_pass_is_kept():
    """A ±1 run (on the reference backend, which every build has) and a Gaussian one in one log format:
    the decoded records equal the optimizer's, noise form included, and replay gives the trained bits."""
    net = _net()
    init = {k: v.clone() for k, v in net.state_dict().items()}
    opt = optim.FZOO(net.parameters(), lr=1e-2, n_directions=3, backend="reference", record=True)
    rec = Recorder(opt, net.named_parameters(), base={"name": "toy"})
    x, y = torch.randn(16, 12, generator=torch.Generator().manual_seed(1)), torch.arange(16) % 3
    for _ in range(3):
        opt.step(lambda: torch.nn.functional.cross_entropy(net(x), y))
    log = load_log(rec.encode())
    assert {r.get("noise") for r in opt.trajectory} == {"rademacher"}
    assert log.records == opt.trajectory and log.header["replay"]["noise"] == "rademacher"
    fresh = _net()
    fresh.load_state_dict(init)
    replay_log(fresh.named_parameters(), log, backend="reference")
    assert all(torch.equal(p, q) for p, q in zip(fresh.parameters(), net.parameters()))


def _with_first_flags(data: bytes, bits: int) -> bytes:
    """The log with `bits` or-ed into its first record's flags byte, re-framed with a valid checksum."""
    import lzma
    import struct
    raw = lzma.decompress(data[fmt._PREFIX.size:-fmt._DIGEST])
    (hl,) = struct.unpack_from("<I", raw)
    header = json.loads(raw[4:4 + hl])
    at = 4 + hl + sum(n for name, n in header["streams"][:[k for k, _ in header["streams"]].index("flags")])
    raw = bytearray(raw)
    raw[at] |= bits
    payload = lzma.compress(bytes(raw))
    body = fmt._PREFIX.pack(fmt.MAGIC, fmt.FORMAT_VERSION, len(payload)) + payload
    return body + hashlib.sha256(body).digest()


def test_unknown_record_flags_are_refused():
    """A pass flagged with a bit this reader does not know (a later noise form, say) cannot be re-issued
    exactly: refused, not replayed as something else. A form the writer has no flag for is refused too."""
    fresh, _, data, opt = _train("mezo")
    assert load_log(_with_first_flags(data, 0)).records == opt.trajectory      # the surgery is faithful
    _refused(_with_first_flags(data, 128), fresh, "unknown record flags 0x80")
    with pytest.raises(ValueError, match="noise form 'uniform'"):
        fmt.encode({}, [dict(opt.trajectory[0], noise="uniform")], opt.seed)


# ----------------------------------------------------------------------------- refusals
@pytest.fixture(scope="module")
def mezo_log():
    fresh, trained, data, _ = _train("mezo")
    return fresh, trained, data


def _refused(data, fresh, match):
    init = [p.clone() for p in fresh.parameters()]
    with pytest.raises(SeedLogError, match=match) as e:
        replay_log(fresh.named_parameters(), load_log(data))
    assert "\n" not in str(e.value)
    assert all(torch.equal(p, q) for p, q in zip(fresh.parameters(), init))      # nothing changed


def test_flipped_bytes_are_refused(mezo_log):
    fresh, _, data = mezo_log
    for pos in range(0, len(data), max(1, len(data) // 97)):
        bad = bytearray(data)
        bad[pos] ^= 0x10
        _refused(bytes(bad), fresh, "damaged|not a .zolog|unknown log format|truncated")


def test_truncated_logs_are_refused(mezo_log):
    fresh, _, data = mezo_log
    for n in (0, 3, 8, 17, len(data) // 2, len(data) - 1):
        _refused(data[:n], fresh, "truncated|not a .zolog")


def _reframe(data, version):
    """The same payload under another format version, with a valid checksum."""
    _, _, n = fmt._PREFIX.unpack_from(data)
    body = fmt._PREFIX.pack(fmt.MAGIC, version, n) + data[fmt._PREFIX.size:fmt._PREFIX.size + n]
    return body + hashlib.sha256(body).digest()


def test_unknown_version_is_refused(mezo_log):
    fresh, _, data = mezo_log
    assert _reframe(data, fmt.FORMAT_VERSION) == data          # the reframing itself is faithful
    _refused(_reframe(data, fmt.FORMAT_VERSION + 1), fresh, "unknown log format version 2")


def test_wrong_base_is_refused(mezo_log):
    fresh, _, data = mezo_log
    other = _net()
    with torch.no_grad():
        other[0].weight[0, 0] += 1e-6
    _refused(data, other, "base mismatch")
    _refused(data, torch.nn.Sequential(torch.nn.Linear(12, 8)), "base mismatch")


# ------------------------------------------------------------------ zo-finetune -> zo-replay
POS = ["good", "great", "fun", "moving", "funny", "smart", "warm", "brilliant"]
NEG = ["bad", "dull", "boring", "awful", "flat", "tedious", "stale", "weak"]
FILL = ["the", "movie", "film", "was", "a", "story", "and", "plot", "really", "very", "is", "it"]
LOGGED = ["mezo", "mezo-svrg", "n-spsa", "zo-sgd-sign", "zo-sgd-cons", "zo-sgd-mmt", "lozo", "forward-grad"]
NOT_LOGGED = ["zo-sgd-mmt-dense", "zo-adam", "lozo-m", "fo-sgd"]


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """A tiny random BERT, a synthetic CSV, and a zo-finetune run with --save-log --save-weights."""
    pytest.importorskip("transformers")
    import random

    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    from zo_kernels.finetune.cli import main

    root = tmp_path_factory.mktemp("seedlog")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + POS + NEG + FILL
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    model = root / "model"
    BertTokenizerFast(vocab_file=str(root / "vocab.txt"), do_lower_case=True).save_pretrained(str(model))
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2,
                                             num_attention_heads=2, intermediate_size=32,
                                             max_position_embeddings=32, num_labels=2)).save_pretrained(str(model))
    rng = random.Random(0)
    rows = ["text,label"]
    for i in range(60):
        words = rng.sample(FILL, 4) + rng.sample(POS if i % 2 else NEG, 2)
        rng.shuffle(words)
        rows.append(f"{' '.join(words)},{'pos' if i % 2 else 'neg'}")
    (root / "data.csv").write_text("\n".join(rows) + "\n")
    out = root / "run"
    rc = main(["--model", str(model), "--dataset", str(root / "data.csv"), "--n-train", "24", "--n-val", "8",
               "--n-test", "8", "--batch-size", "4", "--max-length", "12", "--threads", "1", "--out", str(out),
               "--no-progress", "--no-memory", "--evals", "1", "--queries", "64", "--q", "2", "--large-batch", "8",
               "--fo-epochs", "0.2", "--lr-mezo", "1e-3", "--methods", ",".join(LOGGED + NOT_LOGGED),
               "--save-log", "--save-weights"])
    assert rc == 0
    return {"model": str(model), "out": out, "root": root}


def test_save_log_writes_a_log_per_replayable_method(finetuned):
    out = finetuned["out"]
    res = json.loads((out / "results.json").read_text())
    assert sorted(p.name for p in (out / "logs").iterdir()) == sorted(f"seed0_{m}.zolog" for m in LOGGED)
    for m in LOGGED:
        entry = res["methods"][m]["seed_log"]
        assert entry["bytes"] == (out / "logs" / f"seed0_{m}.zolog").stat().st_size
        assert entry["steps"] == res["methods"][m]["steps"] >= 1
    for m in NOT_LOGGED:
        assert "seed_log" not in res["methods"][m]


_REPLAY = """
import sys
from zo_kernels.native import on_isa
from zo_kernels.seedlog.cli import main
isa, base, logs, out = sys.argv[1], sys.argv[2], sys.argv[3].split(","), sys.argv[4]
with on_isa(isa):
    for threads in ("1", "2"):
        for log in logs:
            name = log.rsplit("/", 1)[-1][:-6]
            rc = main(["--base", base, "--log", log, "--out", f"{out}/{isa}-{threads}-{name}", "--threads", threads,
                       "--no-progress"])
            assert rc == 0, (isa, threads, log)
"""


def _saved_weights(path):
    """A replayed description-head model's tensors by zo-finetune's state_dict names."""
    enc = load_file(os.path.join(path, "model.safetensors"))
    head = load_file(os.path.join(path, "zo_head.safetensors"))
    return {**{"encoder." + k: v for k, v in enc.items()}, **head}


@pytest.mark.slow
def test_replay_in_fresh_processes_on_every_isa_and_thread_count(finetuned):
    out, root = finetuned["out"], finetuned["root"]
    logs = [str(out / "logs" / f"seed0_{m}.zolog") for m in LOGGED]
    dest = root / "replayed"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for isa in cpu_isas():
        r = subprocess.run([sys.executable, "-c", _REPLAY, isa, finetuned["model"], ",".join(logs), str(dest)],
                           capture_output=True, text=True, env=env, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
    for m in LOGGED:
        trained = torch.load(out / "weights" / f"seed0_{m}.pt", weights_only=True)
        for isa in cpu_isas():
            for threads in ("1", "2"):
                got = _saved_weights(dest / f"{isa}-{threads}-seed0_{m}")
                for k, v in got.items():
                    assert torch.equal(v, trained[k]), (m, isa, threads, k)
                log = load_log(fmt.read_bytes(logs[LOGGED.index(m)]))
                assert {n for n, _, _ in log.params} <= set(got)      # every trained tensor compared
                prov = json.loads((dest / f"{isa}-{threads}-seed0_{m}" / "zo_replay.json").read_text())
                assert prov["sha256"] == log.header["final_sha256"]


def _cli(argv):
    """zo-replay in a fresh process."""
    return subprocess.run([sys.executable, "-m", "zo_kernels.seedlog.cli", *argv], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=REPO), timeout=600)


def test_zo_replay_refuses_with_one_line_and_writes_nothing(finetuned, tmp_path):
    log = finetuned["out"] / "logs" / "seed0_mezo.zolog"
    data = log.read_bytes()
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 1
    cases = {"flipped.zolog": (bytes(flipped), "damaged"), "short.zolog": (data[:-5], "truncated"),
             "v2.zolog": (_reframe(data, 2), "unknown log format version")}
    for name, (bad, _) in cases.items():
        (tmp_path / name).write_bytes(bad)
    other = tmp_path / "other-model"           # the same model with one weight changed
    shutil.copytree(finetuned["model"], other)
    weights = load_file(str(other / "model.safetensors"))
    name = next(k for k in weights if k.endswith("word_embeddings.weight"))
    weights[name][5, 0] += 1.0
    save_file(weights, str(other / "model.safetensors"), metadata={"format": "pt"})
    runs = [([finetuned["model"], str(tmp_path / n)], why) for n, (_, why) in cases.items()]
    runs.append(([str(other), str(log)], "base mismatch"))
    for (base, lg), why in runs:
        dest = tmp_path / "out"
        r = _cli(["--base", base, "--log", lg, "--out", str(dest), "--no-progress"])
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("zo-replay: error:") and why in lines[0], r.stderr
        assert not dest.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_fresh_head_lora_run_replays_to_the_saved_adapter(finetuned, tmp_path):
    """--head fresh --peft lora: the rebuilt start (seeded head and adapters, nothing carried) replays to
    the trained adapter; zo-replay writes peft's own adapter files."""
    pytest.importorskip("peft")
    from zo_kernels.finetune.cli import main
    from zo_kernels.seedlog import replay_model

    root, out = finetuned["root"], tmp_path / "run"
    rc = main(["--model", finetuned["model"], "--dataset", str(root / "data.csv"), "--n-train", "24", "--n-val", "8",
               "--n-test", "8", "--batch-size", "4", "--max-length", "12", "--threads", "1", "--out", str(out),
               "--no-progress", "--no-memory", "--evals", "1", "--queries", "64", "--lr-mezo", "1e-2",
               "--methods", "mezo", "--head", "fresh", "--peft", "lora", "--lora-rank", "2",
               "--save-log", "--save-weights"])
    assert rc == 0
    log = out / "logs" / "seed0_mezo.zolog"
    assert load_log(log.read_bytes()).header["init_tensors"] == []        # nothing carried: all seeded
    info = replay_model(finetuned["model"], str(log), str(tmp_path / "tuned"), progress=False)
    saved = load_file(str(tmp_path / "tuned" / "adapter_model.safetensors"))
    trained = {k.replace(".modules_to_save.default", "").replace(".default", ""): v for k, v in
               torch.load(out / "weights" / "seed0_mezo.pt", weights_only=True).items() if "original_module" not in k}
    assert any("lora_A" in k for k in saved) and all(torch.equal(v, trained[k]) for k, v in saved.items())
    assert info["sha256"] == load_log(log.read_bytes()).header["final_sha256"]
