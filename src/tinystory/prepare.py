"""`tinystory prepare`: stories -> cleaned, split, tokenized, packed token streams.

    prepare(settings) -> folder with train.bin, val.bin, meta.json, tokenizer files

Everything is built in a temp folder next to the destination and renamed into place only
when complete, so Ctrl-C or a crash leaves nothing that `open_prepared` accepts:

1. read, clean, de-duplicate and split the stories, streaming, into two spool files
   (`packing.Spool`). Nothing grows with the data but 8 bytes a story (de-duplication);
2. the tokenizer: Mistral v1 (known up front, so step 3 runs during step 1), or a
   byte-level BPE trained on the train spool only;
3. encode spool blocks in `num_proc` worker processes (`packing.Packer`, with
   `encoder.ChunkEncoder`: the fast tokenizer's exact ids, several times faster) and
   append BOS + ids + EOS of every story to train.bin / val.bin, in story order;
4. tokenizer files, then meta.json, then the rename.

The destination is named by a fingerprint of the inputs (file hashes or hub id), the
cleaning rules and options and the tokenizer spec: the same inputs again is a no-op.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tinystory import __version__, cleaning, paths, sources
from tinystory.console import console, info
from tinystory.data import META, open_prepared
from tinystory.errors import DataError, OfflineError, SettingsError
from tinystory.packing import Meter, Packer, Spool
from tinystory.tokenizer import mistral_version, parse_spec

if TYPE_CHECKING:
    from tinystory.settings import Settings
    from tinystory.tokenizer import TokenizerFiles

FORMAT = 1
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
POOL_MIN_BYTES = 4 << 20  # less text than this: worker processes cost more than they save


def prepare(settings: Settings, *, force: bool = False) -> Path:
    """Prepare `settings.data` and return the prepared folder (reused when it exists)."""
    d = settings.data
    kind, size = parse_spec(d.tokenizer)
    spec = "mistral" if kind == "mistral" else f"bpe:{size}"
    if not 0.0 < d.val_fraction < 1.0:
        raise SettingsError(f"data.val_fraction must be between 0 and 1, got {d.val_fraction}", "e.g. 0.01")
    if d.max_stories < 0 or d.num_proc < 0:
        raise SettingsError("data.max_stories and data.num_proc must be 0 or more", "0 means all / one per core")
    srcs = sources.resolve(d.dataset, d.revision)
    for src in srcs:
        if src.kind != "hub":
            src.digest()
    request = fingerprint(settings, srcs, spec, pinned=False)
    try:
        for src in srcs:
            if src.kind == "hub":
                sources.pin_revision(src)
    except OfflineError:  # no Hub: the same request prepared before, if there is one
        if force or (done := _prepared_before(settings, request)) is None:
            raise
        info(f"the Hub is not reachable: using {done}, prepared from {d.dataset} ({d.revision}) before")
        return done
    fp = fingerprint(settings, srcs, spec)
    dest = Path(d.out).expanduser() if d.out else paths.prepared_dir() / folder_name(d.dataset, spec, fp)
    if _reusable(dest, fp, spec, force):
        info(f"already prepared at {dest}")
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale(dest)
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _build(tmp, settings, srcs, spec, {"fingerprint": fp, "request_fingerprint": request})
        _install(tmp, dest, fp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def fingerprint(settings: Settings, srcs: list[sources.Source], spec: str, pinned: bool = True) -> str:
    """sha256 of everything the prepared data depends on (not the tinystory version): the
    hub datasets' commits, or (`pinned=False`, what was asked) their revisions."""
    d = settings.data
    uses_field = any(s.kind in ("jsonl", "json", "parquet", "hub") for s in srcs)
    key = {
        "format": FORMAT, "cleaning": cleaning.VERSION, "sources": [s.key(pinned) for s in srcs],
        "text_field": d.text_field if uses_field else None, "errors": d.errors,
        "max_stories": d.max_stories, "val_fraction": d.val_fraction, "tokenizer": spec,
    }
    if spec == "mistral":  # the shipped tokenizer's version
        key["tokenizer_files"] = mistral_version()
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _prepared_before(settings: Settings, request: str) -> Path | None:
    """The newest prepared folder made for the same request (`fingerprint(pinned=False)`),
    at --out or in the cache."""
    d = settings.data
    found = []
    for folder in [Path(d.out).expanduser()] if d.out else paths.prepared_dir().glob("*"):
        try:
            meta = open_prepared(folder).meta
        except DataError:
            continue
        if meta.get("request_fingerprint") == request:
            found.append((meta.get("created", ""), folder))
    return max(found)[1] if found else None


def folder_name(dataset: str, spec: str, fp: str) -> str:
    """`<dataset>-<tokenizer>-<fingerprint prefix>`, e.g. sample-bpe4096-1a2b3c4d5e6f."""
    stem = Path(dataset.rstrip("/*")).name or "data"
    stem = re.sub(r"\.(txt|jsonl|json|parquet)(\.gz)?$", "", stem) if "/" in dataset or "." in stem else stem
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-.")[:40] or "data"
    return f"{slug}-{spec.replace(':', '')}-{fp[:12]}"


# ------------------------------------------------------------------- destination


def _reusable(dest: Path, fp: str, spec: str, force: bool) -> bool:
    """True when `dest` already holds these data; errors when it holds something else."""
    if not dest.exists():
        return False
    if not dest.is_dir():
        raise DataError(f"{dest} exists and is not a folder", "choose another --out")
    try:
        meta = open_prepared(dest).meta
    except DataError:  # incomplete or corrupt prepared data is rebuilt; anything else is left alone
        if any(dest.iterdir()) and not (dest / META).exists() and not (dest / "train.bin").exists():
            raise DataError(f"{dest} exists and is not a prepared-data folder", "choose a new or empty --out") from None
        return False
    if meta.get("fingerprint") == fp and not force:
        return True
    if force:
        return False
    name = meta.get("tokenizer", {}).get("name")
    if name != spec:
        raise DataError(f"{dest} holds data prepared with tokenizer {name}, not {spec}",
                        "choose another --out, or pass --force to replace it")
    raise DataError(f"{dest} holds data prepared from other inputs or options",
                    "choose another --out, or pass --force to replace it")


def cores() -> int:
    """CPU cores this process may use (what num_proc = 0 means)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _alive(pid: int) -> bool:
    """Whether process `pid` still runs (the owner of a temp folder)."""
    if sys.platform == "win32":  # os.kill(pid, 0) there would terminate the process
        return _alive_windows(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _alive_windows(pid: int) -> bool:
    """Windows: the process can be opened and has no exit code yet."""
    import ctypes  # (Windows only; prepare's start-up path elsewhere never pays for it)

    kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]  # only on Windows
    handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        return bool(kernel32.GetLastError() == 5)  # ERROR_ACCESS_DENIED: it exists, owned by someone else
    try:
        code = ctypes.c_ulong()
        return bool(kernel32.GetExitCodeProcess(handle, ctypes.byref(code))) and code.value == 259  # STILL_ACTIVE
    finally:
        kernel32.CloseHandle(handle)


def _sweep_stale(dest: Path) -> None:
    """Remove temp folders that killed runs left next to `dest`."""
    for p in dest.parent.glob(f".{dest.name}.*-*"):
        m = re.fullmatch(rf"\.{re.escape(dest.name)}\.(tmp|old)-(\d+)", p.name)
        if m and not _alive(int(m.group(2))):
            shutil.rmtree(p, ignore_errors=True)


def _install(tmp: Path, dest: Path, fp: str) -> None:
    """Rename the finished temp folder to `dest` (replacing an old one, for --force)."""
    old = dest.parent / f".{dest.name}.old-{os.getpid()}"
    if dest.exists():
        os.rename(dest, old)
    try:
        os.rename(tmp, dest)
    except OSError:
        with contextlib.suppress(DataError):  # another run finished the same data first
            if open_prepared(dest).meta.get("fingerprint") == fp:
                shutil.rmtree(tmp, ignore_errors=True)
                return
        raise
    shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------- build


def _build(tmp: Path, settings: Settings, srcs: list[sources.Source], spec: str, fps: dict[str, str]) -> None:
    """Everything into `tmp`, meta.json last (`fps`: the fingerprints it records)."""
    from tinystory import tokenizer

    d = settings.data
    kind, size = parse_spec(spec)
    nproc = d.num_proc or cores()
    processes = nproc > 1 and _expected_bytes(srcs, d.max_stories) >= POOL_MIN_BYTES
    counts = cleaning.new_counts()
    times = {"start": time.perf_counter()}
    tok: tokenizer.TokenizerFiles | None = None
    packer = Packer(tmp, nproc)
    try:
        if kind == "mistral":  # known up front: encode while reading
            tok = _start(packer, tokenizer.mistral_folder(), tmp, processes)
            console()  # rich's import (~0.03 s) while the workers load the tokenizer, not after the last block
        times["tokenizer"] = time.perf_counter()
        with Meter("read + clean" + (" + encode" if packer.started else "")) as meter:
            packer.meter = meter
            srcs, spools = _read(tmp, settings, srcs, counts, meter, packer if packer.started else None)
            if packer.started:
                tokens = packer.finish()
        times["read"] = time.perf_counter()
        if tok is None:  # a BPE trained on the train split only, then encode
            with Meter(f"train {spec}", spinner_only=True):
                bpe = tokenizer.train_bpe(spools["train"].texts(), size or 0, length=spools["train"].stories)
                bpe.save_pretrained(str(tmp))
            times["tokenizer"] += time.perf_counter() - times["read"]
            tok = _start(packer, tmp, tmp, processes)
            with Meter("encode", total=sum(s.stories for s in spools.values())) as meter:
                packer.meter = meter
                for spool in spools.values():
                    for offset, nbytes in spool.blocks:
                        packer.add(spool, offset, nbytes)
                tokens = packer.finish()
    finally:
        packer.close()
    for spool in spools.values():
        spool.path.unlink()
    end = time.perf_counter()
    seconds = {"tokenizer": times["tokenizer"] - times["start"], "read": times["read"] - times["start"],
               "total": end - times["start"]}
    assert tok is not None  # set on both paths above
    meta = {**_meta(settings, srcs, spec, tok, spools, tokens, counts), **fps}
    meta["seconds"] = {**{k: round(v, 3) for k, v in seconds.items()}, "processes": nproc if processes else 1}
    with open(tmp / META, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def _start(packer: Packer, files: Path, tmp: Path, processes: bool) -> TokenizerFiles:
    """The tokenizer files in `files` become the prepared folder's (`tmp`); workers load them
    from `files`, while they are copied."""
    from tinystory.tokenizer import describe_files, quick_load_file

    # a cache folder (Mistral) keeps its description and a copy that loads sooner; a BPE
    # trained here is described once (and is small: it loads quickly as it is)
    cached = files != tmp
    tok = dataclasses.replace(describe_files(files, memo=cached), folder=tmp)
    load = quick_load_file(files) if cached else files / "tokenizer.json"
    if tok.bos_id is None or tok.eos_id is None:  # every story is stored as BOS + text + EOS
        raise DataError(f"the tokenizer in {files} has no BOS or EOS token", "use `mistral` or `bpe:N`")
    packer.start(load, tok.bos_id, tok.eos_id, tok.dtype, tok.chunking, processes)
    if cached:  # (while the workers load the tokenizer)
        for name in TOKENIZER_FILES:
            if (files / name).is_file():
                shutil.copyfile(files / name, tmp / name)
    return tok


def _expected_bytes(srcs: list[sources.Source], max_stories: int) -> float:
    """About how much text will be read (to decide whether worker processes pay)."""
    total = sum(math.inf if s.kind == "hub" else s.bytes * (3 if s.gz else 1) for s in srcs)
    return min(total, max_stories * 1000) if max_stories else total  # ~1 kB a story


def _meta(settings: Settings, srcs: list[sources.Source], spec: str, tok: TokenizerFiles,
          spools: dict[str, Spool], tokens: dict[str, int], counts: dict[str, int]) -> dict[str, Any]:
    d = settings.data
    splits = {s: {"stories": spools[s].stories, "tokens": tokens[s], "bytes": spools[s].bytes} for s in spools}
    text_tokens = tokens["train"] - 2 * spools["train"].stories
    return {
        "format": FORMAT, "tinystory_version": __version__, "dtype": tok.dtype,
        "tokenizer": {"name": spec, "sha256": tok.sha256, "vocab_size": tok.vocab_size,
                      "bos_id": tok.bos_id, "eos_id": tok.eos_id, "unk_id": tok.unk_id, "pad_id": tok.pad_id},
        "splits": splits,
        "bytes_per_token": round(spools["train"].bytes / max(text_tokens, 1), 4),  # BOS/EOS not counted
        "sources": [s.describe() for s in srcs],
        "cleaning": {**counts, "kept": sum(s.stories for s in spools.values()), "errors": d.errors,
                     "max_stories": d.max_stories},
        "split_method": "hash" if all(s.role == "hash" for s in srcs) else "source",
        "val_fraction": d.val_fraction,
        "text_field": d.text_field if any(s.kind != "txt" for s in srcs) else None,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _read(tmp: Path, settings: Settings, srcs: list[sources.Source], counts: dict[str, int], meter: Meter,
          packer: Packer | None) -> tuple[list[sources.Source], dict[str, Spool]]:
    """Every input, cleaned, de-duplicated and split, into the two spools (whose blocks
    go to `packer` as they fill, when it is given)."""
    d = settings.data
    pairs = _inputs(srcs, settings, counts)
    srcs = [p[0] for p in pairs]
    hashed = all(s.role == "hash" for s in srcs)
    n = d.max_stories or math.inf
    caps = {"train": n, "val": math.inf if hashed or not d.max_stories else max(100, math.ceil(n / 10))}
    on_block = packer.add if packer is not None else None
    spools = {s: Spool(tmp / f"spool-{s}.bin", s, on_block) for s in ("train", "val")}
    splitter = cleaning.Splitter(counts, d.val_fraction)
    for src, stories in pairs:
        target = "val" if src.role == "val" else "train"
        read, done = 0, spools[target].stories < caps[target]
        with contextlib.closing(stories):
            for raw in stories if done else ():
                read += 1
                text = cleaning.clean(raw, counts)
                if text is None:
                    continue
                data = text.encode("utf-8", "replace")  # "replace": lone surrogates from JSON
                split = splitter.place(data, src.role)
                if split is not None:
                    spools[split].add(data)
                    meter.advance(1, nbytes=len(data))
                if spools[target].stories >= caps[target]:
                    done = False
                    break
        src.info["stories_read"] = read
        if read == 0 and done and src.kind != "hub":
            raise DataError(f"{src.label} holds no stories", "give a file that holds stories")
    for spool in spools.values():
        spool.close()
    if spools["train"].stories == 0:
        raise DataError(f"no training stories left after cleaning ({counts['stories_read']} read)", "check the input")
    if spools["val"].stories == 0:
        hint = ("raise data.val_fraction (e.g. --set data.val_fraction=0.05) or give more stories" if hashed
                else "give validation files that hold stories")
        raise DataError("the validation split is empty", hint)
    return srcs, spools


def _inputs(srcs: list[sources.Source], settings: Settings,
            counts: dict[str, int]) -> list[tuple[sources.Source, Any]]:
    """(source, stream of raw stories) for every input, validation inputs first (so a
    training story that is also a validation story is the one dropped)."""
    d = settings.data
    pairs: list[tuple[sources.Source, Any]] = []
    for src in srcs:
        if src.kind == "hub":
            for sub, split in sources.open_hub(src, d.text_field):
                pairs.append((sub, sources.read_hub(split, sub, d.text_field)))
        else:
            pairs.append((src, sources.read(src, d.text_field, d.errors, counts)))
    return sorted(pairs, key=lambda p: p[0].role != "val")


# ----------------------------------------------------------------------- display


def print_summary(path: str | Path) -> None:
    """A table of what a prepared folder holds, on stderr."""
    from rich.table import Table

    meta = open_prepared(path).meta
    tok = meta["tokenizer"]
    table = Table(title=f"prepared data ({tok['name']}, vocab {tok['vocab_size']:,}, {meta['dtype']})",
                  title_justify="left")
    for col in ("split", "stories", "tokens", "text MB", "bytes/token"):
        table.add_column(col, justify="left" if col == "split" else "right")
    for name, s in meta["splits"].items():
        bpt = s["bytes"] / max(s["tokens"] - 2 * s["stories"], 1)
        table.add_row(name, f"{s['stories']:,}", f"{s['tokens']:,}", f"{s['bytes'] / 1e6:,.2f}", f"{bpt:.2f}")
    console().print(table)
    c = meta["cleaning"]
    console().print(
        f"cleaning: {c['stories_read']:,} read, {c['whitespace_stripped']:,} stripped, "
        f"{c['empty_dropped']:,} empty dropped, {c['mojibake_repaired']:,} mojibake repaired, "
        f"{c['duplicates_dropped']:,} duplicates dropped, {c['cross_split_dropped']:,} in both splits dropped, "
        f"{c['undecodable_bytes_replaced']:,} bad bytes replaced; split by {meta['split_method']}"
    )
