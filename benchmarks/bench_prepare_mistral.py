"""`tinystory prepare --tokenizer mistral` on the shared text: the first run on a machine
(an empty cache: the Mistral tokenizer made ready) and the runs after it (warm cache).

    python benchmarks/bench_prepare_mistral.py [--runs 5] [--exe path/to/tinystory] [--out results.json]

`--exe` picks the installed `tinystory` to time (e.g. the one of another virtualenv, to
compare two releases in one session on one machine). Each run is `prepare --force` of the
four shared training files plus valid.txt (8,704 stories, 7.3 MB) into a fresh folder;
"cold" runs also get a fresh cache dir. Wall seconds, medians, with the CPU named.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import cpu_id, cpu_name

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "tinystories"


def timed(exe: str, data: Path, out: Path, cache: Path) -> float:
    env = {**os.environ, "TINYSTORY_CACHE_DIR": str(cache), "TINYSTORY_PLAIN": "1", "HF_HUB_OFFLINE": "1"}
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    subprocess.run([exe, "prepare", "--dataset", str(data), "--tokenizer", "mistral", "--out", str(out), "--force"],
                   env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--exe", default=shutil.which("tinystory"), help="the tinystory command to time")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if not args.exe:
        sys.exit("tinystory is not installed (pip install -e .)")
    # bytecode for an editable install's modules, as an installed package has it (where
    # PYTHONDONTWRITEBYTECODE is set, each run would compile them anew: ~0.04 s)
    compileall.compile_dir(str(ROOT / "src" / "tinystory"), quiet=1)
    with tempfile.TemporaryDirectory() as tmp_:
        tmp = Path(tmp_)
        data = tmp / "text"
        data.mkdir()
        for f in SHARED.glob("*.txt"):  # train-*.txt and valid.txt: the file names give the split
            (data / f.name).symlink_to(f)
        cold, warm = [], []
        warm_cache = tmp / "warm-cache"
        timed(args.exe, data, tmp / "out", warm_cache)  # fills the warm cache
        for i in range(args.runs):  # interleaved
            cold.append(timed(args.exe, data, tmp / "out", tmp / f"cold-cache-{i}"))
            warm.append(timed(args.exe, data, tmp / "out", warm_cache))
    result = {"exe": args.exe, "cpu": cpu_name(), "cpu_id": cpu_id(), "cores": os.cpu_count(), "runs": args.runs,
              "first_run_s": round(statistics.median(cold), 3), "later_runs_s": round(statistics.median(warm), 3),
              "first_runs": [round(x, 3) for x in cold], "later_runs": [round(x, 3) for x in warm]}
    print(f"CPU: {result['cpu']} ({result['cpu_id']}), {result['cores']} cores; {args.exe}")
    print(f"prepare --tokenizer mistral, shared text: first run on a machine {result['first_run_s']:.2f} s, "
          f"later runs {result['later_runs_s']:.2f} s (medians of {args.runs})")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
