"""Overhead of `tinystory serve` against calling `Generator` directly, on the same model.

For each preset (random weights: speed does not depend on what the model learned), it
saves a run dir and starts two fresh subprocesses that load it alike: `tinystory serve
RUN --port 0` on 127.0.0.1, and a direct worker that times `Generator.stream` calls (what
`tinystory generate` does), with the same threads. This process only coordinates.
Every request makes exactly `--new-tokens` tokens (`min_tokens`, so EOS cannot cut one
short), sampled with a fixed seed, from the same prompt. It reports medians of
`--repeats` runs, interleaved (direct, server, direct, ...) so that load from other
processes hits both alike:

- time to first token (wall, from the call or the HTTP request to the first text piece)
  and end-to-end tokens/s, direct and through the server with one streaming client;
- per-request overhead: server wall time / direct wall time - 1 (target: under 10%),
  from the medians and from the minimums (the least disturbed runs). On a shared
  machine these swing by tens of percent either way, so it also splits the server
  process's CPU time over the same requests, from /proc: the event-loop thread (HTTP,
  JSON, SSE: all that serving adds) against the threads running the model. That ratio
  is the server's own overhead, and other processes' load hardly moves it;
- 4 concurrent streaming clients: their TTFT (queueing included: requests run one at a
  time), tokens/s each, and the aggregate tokens/s against direct.

    python benchmarks/bench_serve.py                              # cpu-3m and tinystories-40m
    python benchmarks/bench_serve.py --presets tiny --repeats 3 --json out.json
    python benchmarks/bench_serve.py --run path/to/run            # a trained run instead
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PROMPT = "Once upon a time, there was a little girl named Lily. She"
# One CPU-name probe and one way to make a random run for the generation benchmarks.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import cpu_name, make_run  # noqa: E402

CLIENTS = 4


class Server:
    """`tinystory serve RUN --port 0` in a subprocess; its stderr log is kept."""

    def __init__(self, run: Path, threads: int) -> None:
        argv = [sys.executable, "-m", "tinystory", "serve", str(run), "--port", "0",
                "--set", f"generate.threads={threads}", "--set", "generate.device=cpu"]
        self.proc = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                                     env={**os.environ, "TINYSTORY_PLAIN": "1", "PYTHONUNBUFFERED": "1"})
        self.log: list[str] = []
        self.url = ""
        deadline = time.monotonic() + 180
        while not self.url and time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                raise SystemExit("the server did not start:\n" + "".join(self.log))
            self.log.append(line)
            m = re.search(r"open (http://127\.0\.0\.1:\d+)/", line)
            self.url = m.group(1) if m else ""
        threading.Thread(target=lambda: self.log.extend(self.proc.stderr), daemon=True).start()

    def cpu_split(self) -> tuple[float, float]:
        """CPU seconds so far of the event-loop (main) thread and of all other threads."""
        loop = other = 0.0
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            try:
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # a thread that just ended
                continue
            cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            if task.name == str(self.proc.pid):
                loop += cpu
            else:
                other += cpu
        return loop, other

    def stop(self) -> None:
        self.proc.send_signal(2)  # Ctrl-C
        self.proc.wait(timeout=60)


def time_direct(gen, params) -> tuple[float, float, int, float]:  # type: ignore[no-untyped-def]
    """(time to first piece, wall seconds, tokens, CPU seconds) of one `Generator.stream`."""
    t0, c0 = time.perf_counter(), time.process_time()
    first = 0.0
    stream = gen.stream(PROMPT, params)
    for _ in stream:
        first = first or time.perf_counter() - t0
    return first, time.perf_counter() - t0, stream.stats.tokens, time.process_time() - c0


class Direct:
    """A subprocess that loads the run like the server does and times direct calls."""

    def __init__(self, run: Path, threads: int, n: int) -> None:
        argv = [sys.executable, __file__, "--direct-worker", str(run), "--threads", str(threads), "--new-tokens",
                str(n)]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True)
        self.info = json.loads(self.proc.stdout.readline())

    def __call__(self) -> tuple[float, float, int, float]:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return tuple(json.loads(self.proc.stdout.readline()))  # type: ignore[return-value]

    def stop(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def direct_worker(run: Path, threads: int, n: int) -> None:
    """--direct-worker: load the run, then time one stream per line read from stdin."""
    from tinystory.generation import Generator
    from tinystory.sampling import SamplingParams

    gen = Generator.load(run, device="cpu", threads=threads)
    params = SamplingParams(max_new_tokens=n, min_new_tokens=n, temperature=1.0, top_p=0.9, seed=0)
    print(json.dumps({"threads": gen.threads, "params": gen.num_parameters}), flush=True)
    for _ in sys.stdin:
        print(json.dumps(time_direct(gen, params)), flush=True)


def time_server(http, url: str, n: int) -> tuple[float, float, int]:  # type: ignore[no-untyped-def]
    """The same through the server: one streaming /v1/completions request."""
    body = {"prompt": PROMPT, "max_tokens": n, "min_tokens": n, "temperature": 1.0, "top_p": 0.9, "seed": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, tokens = 0.0, 0
    with http.stream("POST", f"{url}/v1/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"][0]["text"] and not first:
                first = time.perf_counter() - t0
    return first, time.perf_counter() - t0, tokens


def concurrent(url: str, n: int) -> tuple[list[tuple[float, float, int]], float]:
    """CLIENTS streams started together: each one's figures, and the wall time of all."""
    import httpx

    results: list[tuple[float, float, int]] = []
    barrier = threading.Barrier(CLIENTS)

    def client() -> None:
        with httpx.Client(timeout=600) as http:
            barrier.wait()
            results.append(time_server(http, url, n))

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - t0


def bench(run: Path, n: int, repeats: int, threads: int) -> dict:
    """Interleaved direct / server runs on one preset; medians and ratios."""
    import httpx

    direct_call = Direct(run, threads, n)
    server = Server(run, direct_call.info["threads"])  # the thread count the Generator chose, for both
    try:
        with httpx.Client(timeout=600) as http:
            direct_call(), time_server(http, server.url, n)  # warm-up
            direct, served, many, walls, cpu = [], [], [], [], []
            for _ in range(repeats):
                direct.append(direct_call())
                loop0, other0 = server.cpu_split()
                served.append(time_server(http, server.url, n))
                loop1, other1 = server.cpu_split()
                cpu.append((loop1 - loop0, other1 - other0))
                res, wall = concurrent(server.url, n)
                many += res
                walls.append(sum(t for _, _, t in res) / wall)
    finally:
        server.stop()
        direct_call.stop()
    assert all(r[2] == n for r in direct + served + many), "a request made fewer tokens than asked"
    med = statistics.median
    row = {
        "model": run.name, "params_m": round(direct_call.info["params"] / 1e6, 2),
        "threads": direct_call.info["threads"], "tokens": n,
        "direct_ttft_ms": 1000 * med(f for f, *_ in direct), "direct_tok_s": med(t / w for _, w, t, _ in direct),
        "server_ttft_ms": 1000 * med(f for f, _, _ in served), "server_tok_s": med(t / w for _, w, t in served),
        "overhead": med(w for _, w, _ in served) / med(w for _, w, *_ in direct) - 1,
        "overhead_min": min(w for _, w, _ in served) / min(w for _, w, *_ in direct) - 1,
        "loop_cpu_share": sum(lo for lo, _ in cpu) / sum(o for _, o in cpu),
        "loop_cpu_us_per_token": 1e6 * sum(lo for lo, _ in cpu) / (n * len(cpu)),
        "model_cpu_vs_direct": sum(o for _, o in cpu) / sum(c for *_, c in direct),
        "c4_ttft_ms": 1000 * med(f for f, _, _ in many), "c4_ttft_max_ms": 1000 * max(f for f, _, _ in many),
        "c4_tok_s_each": med(t / w for _, w, t in many), "c4_tok_s_total": med(walls),
    }
    row["c4_vs_direct"] = row["c4_tok_s_total"] / row["direct_tok_s"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="cpu-3m,tinystories-40m")
    ap.add_argument("--run", type=Path, help="a trained run dir instead of random-weight presets")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="0 = the Generator's own choice")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--direct-worker", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.direct_worker:
        return direct_worker(args.direct_worker, args.threads, args.new_tokens)

    load = os.getloadavg()[0]
    print(f"# {cpu_name()}, {os.cpu_count()} cores, load average {load:.2f} at start", flush=True)
    print(f"# {args.new_tokens} new tokens a request, median of {args.repeats} interleaved runs, "
          f"{CLIENTS} concurrent clients", flush=True)
    print(f"{'model':<16}{'thr':>4}{'direct ttft ms':>15}{'tok/s':>7}{'serve ttft ms':>14}{'tok/s':>7}"
          f"{'overhead':>9}{'(min)':>7}{'loop cpu':>9}{'4 clients ttft ms (max)':>25}{'tok/s each':>11}"
          f"{'total':>7}{'vs direct':>10}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = [args.run] if args.run else [make_run(p, Path(tmp), peaked=False) for p in args.presets.split(",")]
        for run in runs:
            r = bench(run, args.new_tokens, args.repeats, args.threads)
            rows.append(r)
            c4 = f"{r['c4_ttft_ms']:.0f} ({r['c4_ttft_max_ms']:.0f})"
            print(f"{r['model']:<16}{r['threads']:>4}{r['direct_ttft_ms']:>15.1f}{r['direct_tok_s']:>7.1f}"
                  f"{r['server_ttft_ms']:>14.1f}{r['server_tok_s']:>7.1f}{r['overhead']:>+9.1%}{r['overhead_min']:>+7.1%}{r['loop_cpu_share']:>9.1%}{c4:>25}"
                  f"{r['c4_tok_s_each']:>11.1f}{r['c4_tok_s_total']:>7.1f}{r['c4_vs_direct']:>10.2f}", flush=True)
    load_end = os.getloadavg()[0]
    print(f"# load average {load_end:.2f} at the end (2 cores shared with other work: compare ratios, not tok/s)")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_name(), "load": [load, load_end], "rows": rows}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
