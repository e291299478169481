"""Every file the code and the docs point to exists in the tree: paths such as docs/spec.md,
zo_kernels/ops.py, csrc/ops.cpp, tests/test_lint.py, benchmarks/..., scripts/..., a top-level
README.md (a file outside the project, like a DESIGN.md that was never part of it, fails), and the
targets of relative Markdown links in docs/*.md and README.md."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
THIS = pathlib.Path(__file__).resolve()

# A path from the repository root: one of its top-level folders, then path characters; it ends in a
# word character or `*` (a glob such as tests/test_optim_*.py), so trailing punctuation is not part of it.
_TOP = ("docs", "zo_kernels", "csrc", "tests", "benchmarks", "scripts", "python")
_PATH = re.compile(r"(?<![\w/.*-])((?:" + "|".join(_TOP) + r")/[\w./*-]*[\w*])")
# Folders the code writes its outputs to (git-ignored): a reference to one is not to a file of the tree.
_OUTPUTS = ("benchmarks/results",)
# A top-level document named by its bare file name (README.md, DESIGN.md).
_TOPDOC = re.compile(r"(?<![\w/.-])([A-Z][A-Z_]*\.md)\b")
# A relative Markdown link target: [text](target), not a URL and not a #fragment of the same page.
_LINK = re.compile(r"\]\((?!https?:|mailto:|#)([^)\s#]+)(?:#[^)]*)?\)")


def _exists(base: pathlib.Path, ref: str) -> bool:
    if "*" in ref:
        return any(base.glob(ref))
    return (base / ref).exists()


def _paths(text: str) -> list:
    # "tests/test_cuda_native.py-style": the path ends with its extension
    refs = [re.sub(r"(\.\w+)-[\w-]+$", r"\1", ref) for ref in _PATH.findall(text)]
    return [ref for ref in refs if not ref.startswith(_OUTPUTS)]


def missing_references(text: str, md_dir=None) -> list:
    """The file references in `text` that do not exist in the tree.  md_dir: the folder a Markdown
    file's relative links are resolved against (None: the text is not Markdown)."""
    bad = [ref for ref in _paths(text) if not _exists(ROOT, ref)]
    bad += [ref for ref in _TOPDOC.findall(text) if not (ROOT / ref).exists()]
    if md_dir is not None:
        bad += [ref for ref in _LINK.findall(text) if not _exists(md_dir, ref)]
    return bad


def _scanned_files():
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for folder in ("zo_kernels", "tests", "scripts", "benchmarks", "python", "csrc"):
        for path in sorted((ROOT / folder).rglob("*")):
            if path.is_file() and path.suffix in (".py", ".sh", ".md", ".cpp", ".h", ".cu", ".cuh", ".toml"):
                files.append(path)
    return [f for f in files if f.resolve() != THIS]


def test_scanner_catches_planted_references():
    planted = ("see docs/no_such_page.md, zo_kernels/no_such_module.py, csrc/cpu/nothing.cpp and DESIGN.md §7; "
               "tests/test_nothing_*.py")
    assert missing_references(planted) == ["docs/no_such_page.md", "zo_kernels/no_such_module.py",
                                           "csrc/cpu/nothing.cpp", "tests/test_nothing_*.py", "DESIGN.md"]
    assert missing_references("[the spec](no_such.md) and [ok](spec.md#2-the-primitive)",
                               md_dir=ROOT / "docs") == ["no_such.md"]


def test_scanner_accepts_real_references():
    text = ("docs/spec.md §7, zo_kernels/ops.py, csrc/ops.cpp, tests/test_optim_*.py, README.md, "
            "scripts/, (zo_kernels/triton/helpers.py). tests/test_lint.py-style; benchmarks/results/x.csv")
    assert missing_references(text) == []
    assert missing_references("[spec](spec.md) [top](../README.md)", md_dir=ROOT / "docs") == []


def test_every_referenced_file_exists():
    bad = []
    for path in _scanned_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        md_dir = path.parent if path.suffix == ".md" else None
        bad += [f"{path.relative_to(ROOT)}: {ref}" for ref in missing_references(text, md_dir)]
    assert not bad, "references to files that are not in the tree:\n" + "\n".join(bad)
