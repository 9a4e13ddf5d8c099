"""`tinystory serve` under load: concurrent streaming clients, clients that hang up, a fuzz.

It saves a random-weight cpu-3m run (speed does not depend on what the model learned) and
starts `tinystory serve RUN --port 0` in a subprocess on 127.0.0.1, as a user would. This
process is the clients:

- load: `--clients` streaming clients at once, `--requests` in all (each client sends its
  share one after another), each `--max-tokens` tokens exactly (`min_tokens`), even ones
  greedy and odd ones sampled with a fixed seed. Every text is compared with the same
  request's text served alone beforehand (a difference = a garbled stream). Reported: time
  to first token and total latency (p50, p99; queueing included: requests run one at a
  time), tokens/s in aggregate and per client (its tokens over its time connected),
  requests completed and failed;
- disconnects: `--disconnects` clients ask for 400 tokens each and hang up after their
  second event; the server's own counters (/health) must show every job finished and
  only a few tokens made for each;
- fuzz: `--fuzz` malformed requests from the test suite's hypothesis strategy
  (tests/test_serve_load.py: wrong types, huge numbers, NaN, unicode, a 10 MB body,
  invalid JSON, wrong content types, unknown fields, paths and methods), each followed by
  a good one-token request. Every malformed one must get its 4xx with a JSON error line:
  the count of 5xx must be 0.

    python benchmarks/bench_serve_load.py                      # 32 clients, 64 requests, 2000 fuzz
    python benchmarks/bench_serve_load.py --clients 8 --requests 16 --fuzz 200 --json /tmp/x.json

Figures on a machine shared with other work are indicative only; the pass/fail columns
(failed, garbled, leaked, 5xx) are not.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))  # the clients and the fuzz strategy are the tests'
from _common import cpu_id, cpu_name  # noqa: E402
from bench_generate import make_run  # noqa: E402
from bench_serve import Server  # noqa: E402

DISCONNECT_TOKENS = 400


def percentiles(values: list[float]) -> dict[str, float]:
    import test_serve_load as t

    return {"p50": t.percentile(values, 50), "p99": t.percentile(values, 99)}


async def load(url: str, clients: int, requests: int, max_tokens: int) -> dict[str, Any]:
    """`requests` streams over `clients` connections at once; figures and failures."""
    import httpx
    import test_serve_load as t

    bodies = [t.story_request(i, max_tokens) for i in range(clients)]
    async with httpx.AsyncClient(timeout=600) as http:  # each request alone first: the reference texts
        reference = [(await t.stream_one(http, url, b)).text for b in bodies]
    share = [requests // clients + (c < requests % clients) for c in range(clients)]
    results: list[tuple[int, t.Streamed]] = []

    async def client(c: int, http: httpx.AsyncClient) -> None:
        for _ in range(share[c]):
            try:
                results.append((c, await t.stream_one(http, url, bodies[c])))
            except httpx.HTTPError as e:
                results.append((c, t.Streamed(0, error=f"{type(e).__name__}: {e}")))

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(c, http) for c in range(clients)))
        wall = time.perf_counter() - t0
    ok = [(c, r) for c, r in results if r.status == 200 and r.done and not r.error and r.tokens == max_tokens]
    garbled = [c for c, r in ok if r.text != reference[c]]
    per_client = [sum(r.tokens for cc, r in ok if cc == c) / sum(r.seconds for cc, r in ok if cc == c)
                  for c in range(clients) if any(cc == c for cc, _ in ok)]
    return {
        "clients": clients, "requests": requests, "max_tokens": max_tokens,
        "completed": len(ok), "failed": len(results) - len(ok), "garbled": len(garbled),
        "statuses": sorted({r.status for _, r in results}),
        "errors": sorted({r.error for _, r in results if r.error})[:5],
        "ttft_s": percentiles([r.ttft for _, r in ok]), "total_s": percentiles([r.seconds for _, r in ok]),
        "wall_s": wall, "tok_s_total": sum(r.tokens for _, r in ok) / wall,
        "tok_s_per_client": statistics.median(per_client) if per_client else 0.0,
    }


async def disconnects(url: str, n: int) -> dict[str, Any]:
    """`n` clients that ask for DISCONNECT_TOKENS tokens and hang up after two events."""
    import httpx
    import test_serve_load as t

    before = t.wait_idle(url, timeout=600)["jobs"]
    body = {"prompt": t.PROMPTS[0], "max_tokens": DISCONNECT_TOKENS, "min_tokens": DISCONNECT_TOKENS, "seed": 1,
            "stream": True}

    async def hang_up(http: httpx.AsyncClient) -> None:
        async with http.stream("POST", f"{url}/v1/completions", json=body) as r:
            seen = 0
            async for line in r.aiter_lines():
                seen += line.startswith("data: ")
                if seen == 2:
                    return

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=n)) as http:
        await asyncio.gather(*(hang_up(http) for _ in range(n)))
    t0 = time.perf_counter()
    after = t.wait_idle(url, timeout=600)["jobs"]
    started, finished = after["started"] - before["started"], after["finished"] - before["finished"]
    tokens = after["tokens"] - before["tokens"]
    leaked = started != n or finished != n or tokens >= n * DISCONNECT_TOKENS / 10
    return {"clients": n, "tokens_asked": n * DISCONNECT_TOKENS, "tokens_made": tokens, "started": started,
            "finished": finished, "idle_after_s": time.perf_counter() - t0, "leaked": leaked}


def fuzz(url: str, model: str, n: int) -> dict[str, Any]:
    """`n` malformed requests (the tests' strategy) and two 10 MB ones, a good one after each."""
    import test_serve_load as t
    from hypothesis import HealthCheck, Phase, example, given, settings
    from hypothesis import strategies as st

    counts = {"sent": 0, "as_expected": 0, "other_4xx": 0, "5xx": 0, "no_answer": 0, "good_answered": 0}
    kinds: dict[str, int] = {}
    surprises: list[str] = []

    @settings(max_examples=n, deadline=None, derandomize=True, database=None, phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=t.malformed(model), prompt=st.text(max_size=40))
    @example(case=t.Case("10 MB prompt", body=t.TEN_MB, status=413), prompt="")
    @example(case=t.Case("10 MB prompt", body=t.TEN_MB, chunks=160, status=413), prompt="")
    def one(case: Any, prompt: str) -> None:
        counts["sent"] += 1
        kinds[case.kind] = kinds.get(case.kind, 0) + 1
        try:
            answer = t.send_case(url, case)
        except OSError as e:
            counts["no_answer"] += 1
            surprises.append(f"{case!r}: {type(e).__name__}: {e}")
            return
        try:
            t.assert_error(*answer, case.status, case.param)
            counts["as_expected"] += 1
        except (AssertionError, ValueError):
            counts["5xx" if answer[0] >= 500 else "other_4xx"] += 1
            surprises.append(f"{case!r} -> {answer[0]} {answer[2][:200]!r}")
        good = {"prompt": prompt, "max_tokens": 1, "temperature": 0}
        status, _, _ = t.send(url, "POST", "/v1/completions", json.dumps(good).encode(),
                              {"Content-Type": "application/json"})
        counts["good_answered"] += status == 200

    one()
    return {**counts, "kinds": kinds, "surprises": surprises[:10]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=32, help="concurrent streaming clients")
    ap.add_argument("--requests", type=int, default=0, help="streaming requests in all (default: 2 per client)")
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens each request makes, exactly")
    ap.add_argument("--disconnects", type=int, default=16, help="clients that hang up mid-stream")
    ap.add_argument("--fuzz", type=int, default=2000, help="malformed requests")
    ap.add_argument("--threads", type=int, default=1, help="the model's CPU threads (the clients need the rest)")
    ap.add_argument("--json", type=Path, default=HERE / "results" / "serve-load.json")
    args = ap.parse_args()
    requests = args.requests or 2 * args.clients

    load_start = os.getloadavg()[0]
    print(f"# {cpu_name()} ({cpu_id()}), {os.cpu_count()} cores, load average {load_start:.2f} at start", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        run = make_run("cpu-3m", Path(tmp), peaked=False)
        server = Server(run, args.threads)
        try:
            import httpx

            card = httpx.get(f"{server.url}/v1/models", timeout=60).json()["data"][0]
            print(f"# {card['id']}: {card['parameters'] / 1e6:.2f}M parameters (random weights), "
                  f"{args.threads} thread(s), `tinystory serve` in a subprocess at {server.url}", flush=True)
            lo = asyncio.run(load(server.url, args.clients, requests, args.max_tokens))
            dis = asyncio.run(disconnects(server.url, args.disconnects))
            fz = fuzz(server.url, card["id"], args.fuzz)
        finally:
            server.stop()
    load_end = os.getloadavg()[0]

    print(f"\nload: {args.clients} concurrent streaming clients, {requests} requests of {args.max_tokens} tokens "
          "(half greedy, half seeded)")
    print(f"{'completed':>10}{'failed':>8}{'garbled':>9}{'ttft p50':>10}{'p99':>8}{'total p50':>11}{'p99':>8}"
          f"{'tok/s total':>13}{'per client':>12}")
    print(f"{lo['completed']:>10}{lo['failed']:>8}{lo['garbled']:>9}{lo['ttft_s']['p50']:>9.2f}s"
          f"{lo['ttft_s']['p99']:>7.2f}s{lo['total_s']['p50']:>10.2f}s{lo['total_s']['p99']:>7.2f}s"
          f"{lo['tok_s_total']:>13.1f}{lo['tok_s_per_client']:>12.2f}")
    if lo["errors"]:
        print(f"  errors: {lo['errors']}")
    print(f"\ndisconnects: {dis['clients']} clients hung up after 2 events: {dis['tokens_made']} tokens made of "
          f"{dis['tokens_asked']} asked; jobs started {dis['started']}, finished {dis['finished']}; idle "
          f"{dis['idle_after_s']:.2f} s after the last left; leaked: {'YES' if dis['leaked'] else 'no'}")
    print(f"\nfuzz: {fz['sent']} malformed requests ({', '.join(f'{k} {v}' for k, v in sorted(fz['kinds'].items()))})")
    print(f"  4xx as expected {fz['as_expected']}, other 4xx {fz['other_4xx']}, 5xx {fz['5xx']}, "
          f"no answer {fz['no_answer']}; good requests between them answered {fz['good_answered']}/{fz['sent']}")
    for s in fz["surprises"]:
        print(f"  ! {s}")
    print(f"# load average {load_end:.2f} at the end (2 cores shared with other work: figures are indicative)")

    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"cpu": cpu_name(), "cpu_id": cpu_id(), "cores": os.cpu_count(),
                                     "load": [load_start, load_end], "model": card, "threads": args.threads,
                                     "load_test": lo, "disconnects": dis, "fuzz": fz}, indent=1) + "\n",
                         encoding="utf-8")
    print(f"# wrote {args.json}")
    if lo["failed"] or lo["garbled"] or dis["leaked"] or fz["5xx"] or fz["no_answer"] or fz["other_4xx"]:
        raise SystemExit(1)


if __name__ == "__main__":
    sys.exit(main())
