"""Where stories come from, read as a stream of raw texts.

- `sample`: the stories bundled in `tinystory/sample/` (train + valid, gzip'd .txt);
- a local file, folder (searched recursively) or glob: `.txt` (stories separated by a
  line `<|endoftext|>`, the official format), `.jsonl`, `.json`, `.parquet`, and
  `.txt.gz` / `.jsonl.gz` / `.json.gz`. Files named `train*` beside files named
  `valid*` / `validation*` / `val*` give the train and validation splits;
- a Hugging Face Hub dataset id (`owner/name`), streamed through `datasets.load_dataset(...,
  streaming=True)` (no Arrow copy of the dataset in the cache), at a commit: the revision
  asked for (`main` unless `--revision`) is resolved to its commit first, and that commit is
  what is read and recorded.

Bytes that are not UTF-8 stop the read with the file and byte offset (`errors="strict"`)
or become U+FFFD and are counted (`errors="replace"`).
"""

from __future__ import annotations

import builtins
import glob
import gzip
import hashlib
import json
import re
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import IO, Any

from tinystory.errors import DataError

SEPARATOR = b"<|endoftext|>"
KINDS = {".txt": "txt", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}
TYPES_HINT = "use .txt (stories separated by <|endoftext|> lines), .jsonl, .json or .parquet"
VAL_NAME = re.compile(r"(valid|validation|val)([^a-z]|$)")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
HUB_VAL_SPLITS = ("validation", "valid", "val")
READ_CHUNK = 1 << 20  # bytes read at a time: bounds memory whatever the file size
MAX_STORY_BYTES = 64 << 20
OFFLINE_HINT = "use a local path (--dataset path/to/stories.txt) or --dataset sample (bundled stories)"


@dataclass
class Source:
    """One input: a file (or bundled file) or a hub dataset split."""

    kind: str  # txt | jsonl | json | parquet | hub
    label: str  # how messages name it
    role: str  # train | val | hash (split chosen by a hash of each story)
    path: Path | None = None
    resource: Any = None  # importlib.resources Traversable of a bundled file
    hub_id: str | None = None
    revision: str = ""  # hub: the branch, tag or commit asked for
    commit: str = ""  # hub: the commit it resolved to (`pin_revision`)
    sha256: str = ""
    bytes: int = 0
    info: dict[str, Any] = field(default_factory=dict)  # filled while reading (stories, hub split)

    @property
    def gz(self) -> bool:
        return self.label.endswith(".gz")

    def open(self) -> IO[builtins.bytes]:
        raw = self._raw()
        return gzip.open(raw) if self.gz else raw  # type: ignore[return-value]

    def _raw(self) -> IO[builtins.bytes]:
        return self.resource.open("rb") if self.resource is not None else open(self.path, "rb")  # type: ignore[arg-type]

    def digest(self) -> None:
        """Fill `sha256` and `bytes` of a file source (hub sources: while reading)."""
        h, n = hashlib.sha256(), 0
        with self._raw() as f:
            while chunk := f.read(READ_CHUNK):
                h.update(chunk)
                n += len(chunk)
        self.sha256, self.bytes = h.hexdigest(), n
        if n == 0:
            raise DataError(f"{self.label} is empty", "give a file that holds stories")

    def key(self, pinned: bool = True) -> dict[str, Any]:
        """What identifies the input (for the prepared folder's fingerprint); for a hub
        dataset its commit, or (`pinned=False`) the revision asked for."""
        if self.kind == "hub":
            return {"hub_id": self.hub_id, "revision": self.commit if pinned else self.revision}
        return {"sha256": self.sha256, "kind": self.kind, "role": self.role}

    def describe(self) -> dict[str, Any]:
        """The meta.json `sources` entry."""
        where = ({"hub_id": self.hub_id, "revision": self.revision, "commit": self.commit} if self.kind == "hub"
                 else {"path": self.label})
        return {**where, "sha256": self.sha256, "bytes": self.bytes, "split": self.role, **self.info}


def file_kind(path: str) -> str | None:
    """txt/jsonl/json/parquet from the file name, or None."""
    name = path.lower()
    if name.endswith(".gz"):
        name = name[:-3]
        return None if name.endswith(".parquet") else KINDS.get(Path(name).suffix)
    return KINDS.get(Path(name).suffix)


def resolve(dataset: str, revision: str = "main") -> list[Source]:
    """The sources that `dataset` (sample | path | folder | glob | hub id at `revision`) names."""
    dataset = dataset.strip()
    if dataset == "sample":
        pkg = resources.files("tinystory.sample")
        return [Source("txt", "sample/train.txt.gz", "train", resource=pkg / "train.txt.gz"),
                Source("txt", "sample/valid.txt.gz", "val", resource=pkg / "valid.txt.gz")]
    path = Path(dataset).expanduser()
    if any(c in dataset for c in "*?["):
        files = [Path(p) for p in sorted(glob.glob(str(path), recursive=True)) if Path(p).is_file()]
        files = [p for p in files if file_kind(p.name)]
        if not files:
            raise DataError(f"{dataset} matches no .txt, .jsonl, .json or .parquet files", "check the pattern")
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and file_kind(p.name)
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise DataError(f"{path} holds no .txt, .jsonl, .json or .parquet files", TYPES_HINT)
    elif path.is_file():
        if not file_kind(path.name):
            raise DataError(f"{path} is not a file type tinystory reads", TYPES_HINT)
        files = [path]
    elif HUB_ID.fullmatch(dataset) and not file_kind(dataset) and not dataset.startswith("."):
        from huggingface_hub.errors import HFValidationError
        from huggingface_hub.utils import validate_repo_id

        try:
            validate_repo_id(dataset)  # no "..", "--" or other names the Hub refuses
        except HFValidationError:
            raise DataError(f"{dataset} is not a valid Hub dataset id", "use owner/name, or a local path") from None
        return [Source("hub", dataset, "auto", hub_id=dataset, revision=revision or "main")]
    else:
        raise DataError(f"{dataset} does not exist", "check the path, or use --dataset sample (bundled stories)")
    return _with_roles(files)


def _with_roles(files: list[Path]) -> list[Source]:
    """train*/val* names give the split when both are there; otherwise a hash split."""
    names = {p: p.name.lower() for p in files}
    train = [p for p in files if names[p].startswith("train")]
    val = [p for p in files if VAL_NAME.match(names[p])]
    if train and val:
        ignored = [p for p in files if p not in train and p not in val]
        if ignored:
            from tinystory.console import warn

            warn(f"ignored (named neither train* nor valid*): {', '.join(str(p) for p in ignored)}")
        return [Source(file_kind(p.name) or "", str(p), "val", path=p) for p in val] + \
               [Source(file_kind(p.name) or "", str(p), "train", path=p) for p in train]
    return [Source(file_kind(p.name) or "", str(p), "hash", path=p) for p in files]


# ------------------------------------------------------------------------- readers


def read(src: Source, text_field: str, errors: str, counts: dict[str, int]) -> Iterator[str]:
    """The raw stories of one file source, in file order."""
    readers: dict[str, Callable[..., Iterator[str]]] = {
        "txt": _read_txt, "jsonl": _read_jsonl, "json": _read_json, "parquet": _read_parquet,
    }
    return readers[src.kind](src, text_field, errors, counts)


def _decode(raw: bytes, src: Source, offset: int, errors: str, counts: dict[str, int]) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if errors == "strict":
            where = f"byte offset {offset + e.start}" + (" of the uncompressed text" if src.gz else "")
            raise DataError(
                f"{src.label} is not UTF-8: byte 0x{raw[e.start]:02x} at {where}",
                "fix the file, or pass --errors replace to replace bad bytes with U+FFFD",
            ) from None
        text = raw.decode("utf-8", "replace")
        counts["undecodable_bytes_replaced"] += text.count("\ufffd") - raw.count("\ufffd".encode())
        return text


def _lead(part: bytes) -> int:
    return 2 if part.startswith(b"\r\n") else 1 if part.startswith(b"\n") else 0


def _unframe(part: bytes) -> bytes:
    """A story without the line break on each side of its `<|endoftext|>` lines (part of
    the format, so not counted as whitespace stripped)."""
    part = part[_lead(part):]
    return part[:-2] if part.endswith(b"\r\n") else part[:-1] if part.endswith(b"\n") else part


def _read_txt(src: Source, _field: str, errors: str, counts: dict[str, int]) -> Iterator[str]:
    """Stories between `<|endoftext|>` markers, decoded one by one (so errors have offsets)."""
    found, offset, buf = False, 0, b""
    with src.open() as f:
        while True:
            chunk = f.read(READ_CHUNK)
            parts = (buf + chunk).split(SEPARATOR)
            buf = parts.pop()  # may continue in the next chunk
            if len(buf) > MAX_STORY_BYTES:  # not stories: say so instead of holding it all
                raise DataError(f"{src.label} has no <|endoftext|> line in {MAX_STORY_BYTES >> 20} MB",
                                "separate the stories of a .txt file by lines holding <|endoftext|>")
            for part in parts:
                found = True
                yield _decode(_unframe(part), src, offset + _lead(part), errors, counts)
                offset += len(part) + len(SEPARATOR)
            if not chunk:
                break
    if buf.strip():  # text after the last marker (the official files end with a marker)
        yield _decode(_unframe(buf), src, offset + _lead(buf), errors, counts)
    if not found:
        from tinystory.console import warn

        warn(f"{src.label} has no <|endoftext|> lines: read as one story")


def _field(obj: Any, src: Source, text_field: str, where: str) -> str:
    if isinstance(obj, str):
        return obj
    if isinstance(obj, dict):
        if text_field in obj:
            value = obj[text_field]
            if value is None or isinstance(value, str):
                return value or ""
            raise DataError(f"{src.label}{where}: field {text_field!r} holds {type(value).__name__}, not text",
                            "pass --text-field with the field that holds the story")
        fields = ", ".join(map(str, obj)) or "none"
        raise DataError(f"{src.label}{where} has no field {text_field!r} (its fields: {fields})",
                        "pass --text-field with the field that holds the story")
    raise DataError(f"{src.label}{where} holds {type(obj).__name__}, not an object with a {text_field!r} field",
                    "give one JSON object (or string) per story")


def _jsonl_lines(lines: Iterator[bytes], src: Source, text_field: str, errors: str,
                 counts: dict[str, int]) -> Iterator[str]:
    offset = 0
    for lineno, raw in enumerate(lines, 1):
        line = _decode(raw, src, offset, errors, counts)
        offset += len(raw)
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{src.label} line {lineno} is not JSON: {e.msg}",
                            "give one JSON object per line") from None
        yield _field(obj, src, text_field, f" line {lineno}")


def _read_jsonl(src: Source, text_field: str, errors: str, counts: dict[str, int]) -> Iterator[str]:
    with src.open() as f:
        yield from _jsonl_lines(iter(f), src, text_field, errors, counts)


def _read_json(src: Source, text_field: str, errors: str, counts: dict[str, int]) -> Iterator[str]:
    """A JSON array (of objects or strings), an object holding one under `text_field`, or
    JSON lines saved as .json (what `datasets` writes). Read whole: JSON has no streaming."""
    with src.open() as f:
        raw = f.read()
    text = _decode(raw, src, 0, errors, counts)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several documents: JSON lines
            # the whole file was decoded (and its bad bytes counted) above: count nothing twice
            yield from _jsonl_lines(iter(raw.splitlines(keepends=True)), src, text_field, errors, defaultdict(int))
            return
        raise DataError(f"{src.label} is not valid JSON: {e.msg} (line {e.lineno})", "fix the file") from None
    if isinstance(data, dict):
        if isinstance(data.get(text_field), list):
            data = data[text_field]
        else:
            data = [data]
    if not isinstance(data, list):
        raise DataError(f"{src.label} holds {type(data).__name__}, not a list of stories", "give a JSON array")
    for i, item in enumerate(data):
        yield _field(item, src, text_field, f" item {i}")


def _read_parquet(src: Source, text_field: str, _errors: str, _counts: dict[str, int]) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(src.path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{src.label} is not a parquet file ({e})", TYPES_HINT) from None
    names = pf.schema_arrow.names
    if text_field not in names:
        raise DataError(f"{src.label} has no field {text_field!r} (its fields: {', '.join(names)})",
                        "pass --text-field with the field that holds the story")
    kind = pf.schema_arrow.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataError(f"{src.label}: field {text_field!r} holds {kind}, not text",
                        "pass --text-field with the field that holds the story")
    for batch in pf.iter_batches(batch_size=4096, columns=[text_field]):
        for value in batch.column(0).to_pylist():
            yield value or ""


# ----------------------------------------------------------------------------- hub


COMMIT = re.compile(r"[0-9a-f]{40}")


def pin_revision(src: Source) -> None:
    """Resolve a hub source's revision (branch, tag or commit) to its commit (`src.commit`),
    so that what is read, fingerprinted and recorded is one fixed version of the dataset.
    A full commit id needs no network."""
    if COMMIT.fullmatch(src.revision):
        src.commit = src.revision
        return
    from tinystory.net import require_hub

    require_hub(f"dataset {src.hub_id}", OFFLINE_HINT)
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        src.commit = HfApi().dataset_info(str(src.hub_id), revision=src.revision).sha or ""
    except RevisionNotFoundError:
        raise DataError(f"dataset {src.hub_id} has no revision {src.revision!r}",
                        "pass --revision with a branch, tag or commit of the dataset") from None
    except RepositoryNotFoundError:
        raise DataError(f"no dataset {src.hub_id} on the Hugging Face Hub",
                        "check the id, or use a local path") from None
    except OSError as e:  # huggingface_hub's connection errors subclass OSError
        from tinystory.errors import OfflineError

        raise OfflineError(f"could not fetch dataset {src.hub_id} from the Hub ({type(e).__name__})",
                           OFFLINE_HINT) from None
    if not src.commit:
        raise DataError(f"the Hub gave no commit for dataset {src.hub_id} at {src.revision!r}", "try again later")


def open_hub(src: Source, text_field: str) -> list[tuple[Source, Any]]:
    """(source, streamed dataset split) pairs of a hub dataset at `src.commit`: its
    validation split when it has one (role 'val', listed first) and its train split, else
    its train split with role 'hash'."""
    from tinystory.net import require_hub

    require_hub(f"dataset {src.hub_id}", OFFLINE_HINT)
    import datasets

    try:
        splits = datasets.load_dataset(src.hub_id, revision=src.commit or src.revision, streaming=True)
    except datasets.exceptions.DatasetNotFoundError:
        raise DataError(f"no dataset {src.hub_id} on the Hugging Face Hub",
                        "check the id, or use a local path") from None
    except (ConnectionError, OSError) as e:
        from tinystory.errors import OfflineError

        raise OfflineError(f"could not fetch dataset {src.hub_id} from the Hub ({type(e).__name__})",
                           OFFLINE_HINT) from None
    if "train" not in splits:
        raise DataError(f"dataset {src.hub_id} has no train split (it has: {', '.join(splits)})", "use a local path")
    columns = splits["train"].column_names
    if columns is not None and text_field not in columns:
        raise DataError(f"dataset {src.hub_id} has no field {text_field!r} (its fields: {', '.join(columns)})",
                        "pass --text-field with the field that holds the story")
    val = next((s for s in HUB_VAL_SPLITS if s in splits), None)
    roles = [("hash", "train")] if val is None else [("val", val), ("train", "train")]
    return [(Source("hub", f"{src.hub_id} ({name} split)", role, hub_id=src.hub_id, revision=src.revision,
                    commit=src.commit, info={"hub_split": name}), splits[name]) for role, name in roles]


def read_hub(split: Any, src: Source, text_field: str) -> Iterator[str]:
    """Stories of one split of a hub dataset. `sha256` hashes what was read (8-byte
    length + UTF-8 of each story), since there is no file to hash."""
    h = hashlib.sha256()
    try:
        for batch in split.iter(batch_size=1000):
            for text in batch[text_field]:
                text = text or ""
                data = text.encode("utf-8")
                h.update(len(data).to_bytes(8, "little") + data)
                src.bytes += len(data)
                yield text
    finally:  # also when the reader stops early (max_stories)
        src.sha256 = h.hexdigest()
