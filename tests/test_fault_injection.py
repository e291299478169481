"""A run's files are never lost (issue 27): zo-finetune under full disks, read-only and shared output
directories, damaged checkpoints and data files, and bad arguments.  Each case asserts one line on
stderr, exit code 2, and every file the output directory held before, byte for byte."""
import errno
import json
import os
import subprocess
import sys
import time

import pytest
from test_finetune_resume import _cmd, _env

from test_finetune_cli import _base, tiny  # noqa: F401  (the tiny model + data fixture)

torch = pytest.importorskip("torch")

from zo_kernels.finetune import checkpoint as ck  # noqa: E402
from zo_kernels.finetune import files  # noqa: E402
from zo_kernels.finetune.cli import main  # noqa: E402

FAST = ["--methods", "mezo", "--steps", "6", "--evals", "2", "--no-memory"]


def _kept(out):
    """Every file of `out` (recursively) with its bytes."""
    got = {}
    for root, _, names in os.walk(out):
        for n in names:
            p = os.path.join(root, n)
            with open(p, "rb") as f:
                got[os.path.relpath(p, out)] = f.read()
    return got


def _one_line(err: str, *words):
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("zo-finetune: error:"), err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


@pytest.fixture
def used_dir(tmp_path):
    """An output directory holding an earlier run's files: a checkpoint mid-run, results, a plot."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(os.urandom(4096))
    (out / "results.json").write_text('{"earlier": "results"}\n')
    (out / "curves.png").write_bytes(b"\x89PNG earlier plot")
    return out


def _refused(capsys, argv, out, *words, stdout_empty=True):
    before = _kept(out)
    assert main(argv) == 2
    cap = capsys.readouterr()
    _one_line(cap.err, *words)
    if stdout_empty:        # refused before the model loaded (nothing trained, nothing printed)
        assert cap.out.strip() == "", cap.out
    assert _kept(out) == before
    return cap


# ------------------------------------------------------------------ failing before training
@pytest.mark.parametrize("bad", ["dataset", "model"])
def test_new_run_failing_before_training_keeps_the_directory(tiny, used_dir, tmp_path, capsys, bad):  # noqa: F811
    argv = _base(tiny, used_dir, *FAST, "--checkpoint-every", "2")
    argv[argv.index("--" + bad) + 1] = str(tmp_path / "nowhere.csv" if bad == "dataset" else tmp_path)
    _refused(capsys, argv, used_dir, "does not exist" if bad == "dataset" else "")


@pytest.mark.parametrize("extra,words", [
    (["--backend", "nosuch"], ["--backend nosuch", "unknown backend"]),
    (["--eps", "1e-30"], ["--eps 1e-30 is too small for float32"]),
    (["--text-column", "text", "--label-column", "text"], ["both the text and the label column"]),
    (["--methods", "mezo-svrg", "--queries", "20", "--large-batch", "16"], ["below one MeZO-SVRG step (32"]),
])
def test_bad_arguments_are_one_line_before_training(tiny, used_dir, capsys, extra, words):  # noqa: F811
    argv = _base(tiny, used_dir, *(["--no-memory"] if "--methods" in extra else FAST), *extra)
    # The backend and eps checks come before the model is loaded: a model path that is no model proves it.
    if extra[0] in ("--backend", "--eps"):
        argv[argv.index("--model") + 1] = str(used_dir)
    _refused(capsys, argv, used_dir, *words, stdout_empty=extra[0] != "--methods")


def test_triton_backend_on_a_cpu_machine_is_one_line(tiny, used_dir):  # noqa: F811
    """In its own process: the test session runs Triton on CPU under its interpreter (conftest)."""
    if torch.cuda.is_available():
        pytest.skip("triton runs here")
    env = {k: v for k, v in _env().items() if k != "TRITON_INTERPRET"}
    argv = _base(tiny, used_dir, *FAST, "--backend", "triton")
    argv[argv.index("--model") + 1] = str(used_dir)     # no model: the backend is refused first
    before = _kept(used_dir)
    r = subprocess.run(_cmd(*argv), env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stdout.strip() == ""
    _one_line(r.stderr, "--backend triton", "unavailable")
    assert _kept(used_dir) == before


# ------------------------------------------------------------------ output directory
def test_read_only_out_is_refused_before_any_work(tiny, used_dir, capsys, monkeypatch):  # noqa: F811
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if os.fspath(p) == str(used_dir) and mode & os.W_OK
                        else real(p, mode, **kw))
    _refused(capsys, _base(tiny, used_dir, *FAST), used_dir, "not writable")


def test_out_that_is_a_file_is_refused(tiny, tmp_path, capsys):  # noqa: F811
    f = tmp_path / "file"
    f.write_text("mine")
    assert main(_base(tiny, f, *FAST)) == 2
    _one_line(capsys.readouterr().err, "exists and is not a directory")
    assert f.read_text() == "mine"


def _sleeper(out, code):
    p = subprocess.Popen([sys.executable, "-c", code, str(out)], env=_env(), stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


HOLD = ("import sys, time; from zo_kernels.finetune import files; l = files.RunLock(sys.argv[1]).acquire(); "
        "print('ready', flush=True); time.sleep(120)")


def test_directory_in_use_by_a_live_run_is_refused_and_its_temp_files_stay(tiny, used_dir):  # noqa: F811
    """Two processes: one holds the directory (as a running zo-finetune does), the CLI in another is
    refused with the holder's PID; the holder's temporary file stays, a dead process's goes."""
    holder = _sleeper(used_dir, HOLD)
    try:
        live = used_dir / f"results.json.tmp.{holder.pid}"
        live.write_bytes(b"being written")
        before = _kept(used_dir)
        r = subprocess.run(_cmd(*_base(tiny, used_dir, *FAST)), env=_env(), capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 2
        _one_line(r.stderr, "in use by another zo-finetune run", f"PID {holder.pid}")
        assert _kept(used_dir) == before
    finally:
        holder.kill()
        holder.wait()
    # The holder is dead: its lock is gone with it (flock), and its temporary file is garbage now.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (used_dir / f"checkpoint.pt.tmp.{int(dead.stdout)}").write_bytes(b"orphan")
    assert files.pid_alive(holder.pid) is False
    lock = files.open_run_dir(str(used_dir))
    try:
        assert not any(".tmp." in n for n in os.listdir(used_dir))
    finally:
        lock.release()
    assert not os.path.exists(used_dir / files.LOCK)


def test_two_cli_runs_on_one_directory_one_is_refused(tiny, tmp_path):  # noqa: F811
    out = tmp_path / "shared"
    slow = _base(tiny, out, "--methods", "mezo", "--steps", "400", "--evals", "2", "--no-memory")
    a = subprocess.Popen(_cmd(*slow), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not os.path.exists(out / files.LOCK) and time.time() < deadline:
            time.sleep(0.1)
        b = subprocess.run(_cmd(*_base(tiny, out, *FAST)), env=_env(), capture_output=True, text=True, timeout=300)
        assert b.returncode == 2
        _one_line(b.stderr, f"PID {a.pid}")
        assert a.wait(timeout=600) == 0
    finally:
        if a.poll() is None:
            a.kill()
            a.wait()
    assert json.loads((out / "results.json").read_text())["methods"]["mezo"]["steps"] == 400


# ------------------------------------------------------------------ full disk
def _full_disk(monkeypatch, target: str, after_bytes: int = 100, skip: int = 0):
    """files.write_atomic's writes of `target` (a file name) fail with ENOSPC after `after_bytes`
    bytes, from the (skip+1)-th write of it on."""
    real = open
    seen = {"n": 0}

    class Full:
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, b):
            self.n += len(b)
            if self.n > after_bytes:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(b)

        def __getattr__(self, k):
            return getattr(self.f, k)

        def __enter__(self):
            return self

        def __exit__(self, *e):
            self.f.close()

    def fake_open(p, mode="r", *a, **kw):
        f = real(p, mode, *a, **kw)
        if os.path.basename(str(p)).startswith(target + ".tmp."):
            seen["n"] += 1
            if seen["n"] > skip:
                return Full(f)
        return f

    monkeypatch.setattr(files, "open", fake_open, raising=False)
    return seen


def test_disk_full_writing_results_keeps_the_previous_results(tiny, used_dir, capsys, monkeypatch):  # noqa: F811
    _full_disk(monkeypatch, "results.json")
    before = _kept(used_dir)
    assert main(_base(tiny, used_dir, *FAST)) == 2
    _one_line(capsys.readouterr().err, "cannot write", "results.json", "no space left on device",
              "previous file is unchanged")
    assert _kept(used_dir) == before        # no temporary file, no lock file, results.json intact


def test_disk_full_during_a_checkpoint_then_resume(tiny, tmp_path, capsys, monkeypatch):  # noqa: F811
    out = tmp_path / "run"
    seen = _full_disk(monkeypatch, "checkpoint.pt", after_bytes=1000, skip=2)
    assert main(_base(tiny, out, *FAST, "--checkpoint-every", "1")) == 2
    _one_line(capsys.readouterr().err, "cannot write", "checkpoint.pt", "previous file is unchanged")
    assert seen["n"] == 3
    assert sorted(os.listdir(out)) == ["checkpoint.pt"]      # no orphan temporary file
    ck.check(ck.read(str(out / "checkpoint.pt")))              # the previous checkpoint, whole
    monkeypatch.undo()
    assert main(["--resume", str(out), "--no-progress"]) == 0
    assert json.loads((out / "results.json").read_text())["methods"]["mezo"]["steps"] == 6


def test_write_atomic_on_interrupt_and_disk_full(tmp_path, monkeypatch):
    p = tmp_path / "x.json"
    p.write_text("old")

    def interrupted(f):
        f.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        files.write_atomic(str(p), interrupted)
    _full_disk(monkeypatch, "x.json", after_bytes=2)
    with pytest.raises(files.FinetuneError, match="no space left on device"):
        files.write_json(str(p), {"new": 1})
    assert os.listdir(tmp_path) == ["x.json"] and p.read_text() == "old"


# ------------------------------------------------------------------ damaged checkpoints
def _state_without(key):
    st = {"version": 1, "argv": ["--methods", "mezo"], "runs": [], "current": None}
    del st[key]
    return st


@pytest.mark.parametrize("content,words", [
    (b"", "empty, truncated or not a torch.save file"),
    (b"garbage" * 100, "empty, truncated or not a torch.save file"),
    ("missing", "has no 'runs'"),
    ("bad-run", "checkpoint['runs'][0] has no 'start'"),
    ("object", "objects other than tensors"),
])
def test_damaged_checkpoint_is_one_line_and_left_as_it_is(tmp_path, capsys, content, words):
    out = tmp_path / "run"
    out.mkdir()
    p = out / "checkpoint.pt"
    if content == "missing":
        torch.save(_state_without("runs"), p)
    elif content == "bad-run":
        torch.save({"version": 1, "argv": [], "runs": [{"seed": 0}], "current": None}, p)
    elif content == "object":
        torch.save({"version": 1, "argv": [], "x": subprocess.CompletedProcess([], 0)}, p)
    else:
        p.write_bytes(content)
    before = _kept(out)
    with _no_warnings():
        assert main(["--resume", str(out), "--no-progress"]) == 2
    _one_line(capsys.readouterr().err, "--resume", words)
    assert _kept(out) == before


class _no_warnings:
    def __enter__(self):
        import warnings

        self.cm = warnings.catch_warnings(record=True)
        self.got = self.cm.__enter__()
        warnings.simplefilter("always")

    def __exit__(self, *e):
        self.cm.__exit__(*e)
        assert not self.got, [str(w.message) for w in self.got]


# ------------------------------------------------------------------ data files
def _write(p, data: bytes):
    p.write_bytes(data)
    return str(p)


@pytest.mark.parametrize("name,data,words", [
    ("empty.csv", b"", "the file is empty"),
    ("header.csv", b"text,label\n", "no rows"),
    ("latin.csv", b"text,label\n\xe9t\xe9 bad,1\nok,0\n", "not UTF-8"),
    ("array.json", b"[1, 2, 3]", "JSON array of values, not records"),
    ("cols.json", b'{"text": ["a", "b", "c"], "label": [0, 1, 0]}', "holds lists"),
    ("g.csv.gz", b"not gzip at all", "compression is damaged"),
    ("float.csv", b"text,label\na,0.5\nb,1.5\nc,0.5\nd,1.5\n", "not integers (0.5, 1.5)"),
])
def test_bad_data_file_is_one_line_naming_the_cause(tiny, tmp_path, used_dir, capsys, name, data, words):  # noqa: F811
    argv = _base(tiny, used_dir, *FAST)
    argv[argv.index("--dataset") + 1] = _write(tmp_path / name, data)
    _refused(capsys, argv, used_dir, words)


def test_directory_of_files_with_different_columns(tiny, tmp_path, used_dir, capsys):  # noqa: F811
    d = tmp_path / "mixed"
    d.mkdir()
    _write(d / "a.csv", b"text,label\na,0\n")
    _write(d / "b.csv", b"sentence,y\nb,1\n")
    argv = _base(tiny, used_dir, *FAST)
    argv[argv.index("--dataset") + 1] = str(d)
    _refused(capsys, argv, used_dir, "different columns", "a.csv: ['text', 'label']", "b.csv: ['sentence', 'y']")


def test_dropped_rows_are_counted_and_the_label_ids_recorded(tiny, tmp_path, capsys):  # noqa: F811
    rows = open(tiny["csv"]).read().splitlines()
    csv = tmp_path / "holes.csv"
    csv.write_text("\n".join(rows + ["no label here,", ",pos"]) + "\n")
    out = tmp_path / "run"
    argv = _base(tiny, out, *FAST)
    argv[argv.index("--dataset") + 1] = str(csv)
    assert main(argv) == 0
    head = capsys.readouterr().out.splitlines()[:3]
    assert any("dropped 2 missing text or label" in x for x in head), head
    res = json.loads((out / "results.json").read_text())
    assert res["data"]["label_ids"] == {"neg": 0, "pos": 1}
    assert res["data"]["dropped_rows"] == {"missing_text_or_label": 2}
    assert not os.path.exists(out / files.LOCK)


def test_real_full_disk_on_a_small_tmpfs(tmp_path):
    """The same with a real full file system where one can be mounted (root): torch.save of 4 MB over a
    kept file on a 1 MB tmpfs."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        kept = mnt / "checkpoint.pt"
        torch.save({"w": torch.zeros(1000)}, kept)
        before = kept.read_bytes()
        with pytest.raises(files.FinetuneError, match="no space left on device.*previous file is unchanged"):
            ck.save(str(mnt), {"w": torch.zeros(1 << 20)})
        assert os.listdir(mnt) == ["checkpoint.pt"] and kept.read_bytes() == before
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
