"""What a plain `pip install tinystory-llm` costs: seconds and megabytes.

Builds the wheel of this checkout (or takes `--wheel`), then, `--runs` times: a fresh
virtualenv, the CPU torch (timed apart: the README installs it first), then the wheel with
no extras, timed. Reports the median install time, the packages it brought and the MB they
take in site-packages (torch and its own dependencies counted apart), with the CPU named.

    python benchmarks/bench_install.py [--runs 3] [--wheel dist/x.whl] [--out results.json]

Install time depends on where pip finds the packages: on a machine with a local package
index (no download) it is mostly unpacking and byte-compiling, so the figure is a floor.
Run the before and the after in one session, on one machine.
"""

from __future__ import annotations

import argparse
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
TORCH = "torch==2.13.0"


def build_wheel(out: Path) -> Path:
    subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--wheel", "--outdir", str(out), str(ROOT)],
                   check=True, capture_output=True)
    return next(out.glob("*.whl"))


def site_packages(venv: Path) -> Path:
    return next((venv / "lib").glob("python3*/site-packages"))


def distributions(venv: Path) -> dict[str, float]:
    """name -> MB on disk of every installed distribution (files listed in its RECORD)."""
    code = (
        "import json, importlib.metadata as m, os\n"
        "out = {}\n"
        "for d in m.distributions():\n"
        "    size = 0\n"
        "    for f in d.files or []:\n"
        "        p = d.locate_file(f)\n"
        "        size += os.path.getsize(p) if os.path.isfile(p) else 0\n"
        "    out[d.metadata['Name'].lower()] = size / 1e6\n"
        "print(json.dumps(out))\n"
    )
    r = subprocess.run([str(venv / "bin" / "python"), "-c", code], check=True, capture_output=True, text=True)
    return json.loads(r.stdout)


def tree_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink()) / 1e6


def one_run(wheel: Path, work: Path) -> dict:
    venv = work / "venv"
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, TORCH], check=True, capture_output=True)
    with_torch = distributions(venv)
    sp_torch = tree_mb(site_packages(venv))
    t0 = time.perf_counter()
    subprocess.run([*pip, str(wheel)], check=True, capture_output=True)
    seconds = time.perf_counter() - t0
    after = distributions(venv)
    added = {k: round(v, 2) for k, v in sorted(after.items(), key=lambda kv: -kv[1]) if k not in with_torch}
    return {"seconds": round(seconds, 2), "site_packages_mb": round(tree_mb(site_packages(venv)), 1),
            "site_packages_mb_torch_only": round(sp_torch, 1), "added_mb": round(sum(added.values()), 1),
            "added": added}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--wheel", type=Path, help="a built wheel (default: build this checkout's)")
    ap.add_argument("--label", default="", help="a name for this build in the results (e.g. before/after)")
    ap.add_argument("--out", type=Path, help="write the results here as JSON")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        wheel = args.wheel or build_wheel(work / "dist")
        runs = [one_run(wheel, work) for _ in range(args.runs)]
    last = runs[-1]
    result = {
        "label": args.label, "wheel": wheel.name, "cpu": cpu_name(), "cpu_id": cpu_id(), "cores": os.cpu_count(),
        "runs": len(runs), "install_seconds_median": statistics.median(r["seconds"] for r in runs),
        "install_seconds": [r["seconds"] for r in runs], "added_mb": last["added_mb"],
        "site_packages_mb": last["site_packages_mb"], "site_packages_mb_torch_only":
        last["site_packages_mb_torch_only"], "packages_added": len(last["added"]), "added": last["added"],
    }
    print(f"CPU: {result['cpu']} ({result['cpu_id']}), {result['cores']} cores; {len(runs)} fresh virtualenvs")
    print(f"pip install {wheel.name} (no extras, CPU torch already there): "
          f"median {result['install_seconds_median']:.1f} s {result['install_seconds']}")
    print(f"it added {result['packages_added']} distributions, {result['added_mb']:.1f} MB "
          f"(site-packages {result['site_packages_mb']:.0f} MB, of which torch and its dependencies "
          f"{result['site_packages_mb_torch_only']:.0f} MB)")
    for name, mb in list(last["added"].items())[:12]:
        print(f"  {name:<28} {mb:8.1f} MB")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
