"""Serving benchmark: the HTTP server under load, against offline `Model.generate` on the same
requests, in one run.

    python benchmarks/serve_bench.py --config bench-cpu --requests 32 --concurrency 8
    python benchmarks/serve_bench.py --config demo --rate 4          # Poisson arrivals, 4 req/s
    python benchmarks/serve_bench.py --url http://127.0.0.1:8000 --vocab 131072 --no-offline

Without `--url` it starts `python -m grok1.serve` on a free 127.0.0.1 port (`--startups 2`
starts it twice and reports both start-up times: the first fills the compilation cache, the
second reads it). `--config bench-cpu` (or `tiny`) serves random int8 weights written once
under `--workdir`; `--config demo` the embedded demo model.

Requests: `--requests` prompts of `--prompt` random token ids, each asking `--max-tokens` tokens
(EOS ignored, greedy unless `--temperature`), streamed, sent by `--concurrency` clients (or at a
Poisson `--rate`). Per request: TTFT (submit to first streamed token) and TPOT (time between its
later tokens); overall output tokens/s from the first submit to the last token. First come
`--warmup-rounds` untimed passes of the same requests (programs the engine compiles at first
use; the offline run's first call is not timed either), then one request alone, whose TTFT and
TPOT give the bound "one prefill plus two decode horizons", then the timed load. Then, with the
server stopped, the same model is loaded here and `Model.generate` runs the same requests
(`--max-slots` rows at a time), after as many untimed passes. Prints a table and writes
everything to `--json`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="bench-cpu", help="bench-cpu, tiny or demo")
    ap.add_argument("--url", default=None, help="a running server (else one is started)")
    ap.add_argument("--vocab", type=int, default=None, help="with --url: prompt ids below this")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rate", type=float, default=None, help="Poisson arrivals per second")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens per request")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--max-slots", type=int, default=8)
    ap.add_argument("--horizon", type=int, default=8)
    ap.add_argument("--startups", type=int, default=1, help="start the server this many times")
    ap.add_argument("--rounding", default="release")
    ap.add_argument(
        "--compilation-cache",
        default=None,
        metavar="DIR",
        help="the server's compilation cache (a fresh DIR measures a cold start)",
    )
    ap.add_argument("--workdir", default=os.path.expanduser("~/.cache/grok1/bench"))
    ap.add_argument("--no-offline", action="store_true", help="skip Model.generate")
    ap.add_argument(
        "--warmup-rounds",
        type=int,
        default=1,
        help="untimed passes of the same requests before measuring",
    )
    ap.add_argument(
        "--log-compiles",
        action="store_true",
        help="count the programs the server compiles in each phase (JAX_LOG_COMPILES)",
    )
    ap.add_argument("--json", default=None)
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


# -- the model --------------------------------------------------------------------------------
def model_dir(config_name: str, workdir: str, seed: int) -> str:
    """The checkpoint to serve: the demo's, or random weights written once (atomically)."""
    if config_name == "demo":
        from grok1 import demo

        return demo.demo_path()
    path = os.path.join(workdir, f"{config_name}-seed{seed}")
    if os.path.isdir(os.path.join(path, "ckpt-0")):
        return path
    import jax

    from grok1.checkpoint import loader
    from grok1.config import ModelConfig
    from grok1.model import Grok1, WeightFormats

    config = ModelConfig.preset(config_name)
    grok = Grok1(config, WeightFormats.release(config))
    params = jax.jit(grok.init)(jax.random.PRNGKey(seed))
    tmp = f"{path}.tmp{os.getpid()}"
    loader.save_params(tmp, config, params)
    os.replace(tmp, path)
    return path


def vocab_size(path: str) -> int:
    from grok1.config import ModelConfig

    return ModelConfig.load(path).vocab_size


# -- the server -------------------------------------------------------------------------------
def start_server(path: str, args, log_path: str) -> tuple[subprocess.Popen, str, float]:
    """Starts the server on a free port; returns (process, url, seconds until ready)."""
    cmd = [sys.executable, "-m", "grok1.serve", "--checkpoint", path, "--port", "0",
           "--max-slots", str(args.max_slots), "--horizon", str(args.horizon),
           "--max-queue", str(max(256, args.requests)), "--rounding", args.rounding]  # fmt: skip
    if args.compilation_cache:
        cmd += ["--compilation-cache", args.compilation_cache]
    env = {**os.environ, "PYTHONPATH": REPO, "PYTHONUNBUFFERED": "1"}
    if args.log_compiles:
        env["JAX_LOG_COMPILES"] = "1"
    t0 = time.monotonic()
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    line = proc.stdout.readline()  # the one line printed when ready
    if not line.startswith("grok1 serving"):
        proc.kill()
        raise SystemExit(f"the server did not start (see {log_path}): {line!r}")
    url = line.split(" at ")[1].split()[0].removesuffix("/v1")
    return proc, url, time.monotonic() - t0


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(2)  # SIGINT: uvicorn stops, the engine closes
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# -- the load ---------------------------------------------------------------------------------
async def one_request(client, url: str, prompt: list[int], args) -> dict:
    body = {"prompt": prompt, "max_tokens": args.max_tokens, "temperature": args.temperature,
            "ignore_eos": True, "stream": True, "return_token_ids": True, "seed": 0}  # fmt: skip
    t0 = time.monotonic()
    first, tokens = None, []
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {await r.aread()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            new = json.loads(line[6:])["choices"][0].get("token_ids") or []
            if new and first is None:
                first = time.monotonic()
            tokens += new
    end = time.monotonic()
    n = len(tokens)
    return {"start": t0, "end": end, "tokens": tokens, "ttft": (first or end) - t0,
            "tpot": (end - first) / (n - 1) if first and n > 1 else None}  # fmt: skip


async def drive(url: str, prompts: list[list[int]], args) -> list[dict]:
    import httpx

    limits = httpx.Limits(max_connections=max(args.concurrency, 64))
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        if args.rate:
            rng = np.random.default_rng(args.seed + 1)
            tasks = []
            for p in prompts:
                tasks.append(asyncio.create_task(one_request(client, url, p, args)))
                await asyncio.sleep(rng.exponential(1 / args.rate))
            return list(await asyncio.gather(*tasks))
        gate = asyncio.Semaphore(args.concurrency)

        async def limited(p):
            async with gate:
                return await one_request(client, url, p, args)

        return list(await asyncio.gather(*(limited(p) for p in prompts)))


def summarize(results: list[dict]) -> dict:
    ttft = np.array([r["ttft"] for r in results])
    tpot = np.array([r["tpot"] for r in results if r["tpot"] is not None])
    n = sum(len(r["tokens"]) for r in results)
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    pct = lambda a, q: float(np.percentile(a, q)) if len(a) else None  # noqa: E731
    return {"requests": len(results), "output_tokens": n, "wall_s": wall,
            "output_tok_s": n / wall, "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
            "tpot_p50_s": pct(tpot, 50), "tpot_p99_s": pct(tpot, 99)}  # fmt: skip


# -- offline ----------------------------------------------------------------------------------
def offline(path: str, prompts: list[list[int]], args) -> dict:
    import grok1

    kw = {"compilation_cache": args.compilation_cache} if args.compilation_cache else {}
    model = grok1.load(path, rounding=args.rounding, max_slots=args.max_slots,
                       horizon=args.horizon, **kw)  # fmt: skip
    kw = dict(temperature=args.temperature, ignore_eos=True, max_batch=args.max_slots)
    for _ in range(max(1, args.warmup_rounds)):  # untimed, as the server's warm-up passes
        model.generate(prompts, args.max_tokens, **kw)
    t0 = time.monotonic()
    out = model.generate(prompts, args.max_tokens, **kw)
    wall = time.monotonic() - t0
    n = sum(len(t) for t in out)
    model.close()
    return {"output_tokens": n, "wall_s": wall, "output_tok_s": n / wall, "tokens": out}


def compiles(log_path: str | None) -> int:
    """Programs compiled so far according to the server's log (with --log-compiles)."""
    if log_path is None or not os.path.exists(log_path):
        return 0
    with open(log_path, errors="replace") as f:
        return sum("Compiling " in line for line in f)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        return names[0] if names else platform.machine()
    except OSError:
        return platform.processor() or platform.machine()


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    path = model_dir(args.config, args.workdir, args.seed) if not args.url else None
    vocab = vocab_size(path) if path else (args.vocab or 2048)
    rng = np.random.default_rng(args.seed)
    prompts = [rng.integers(3, vocab, args.prompt).tolist() for _ in range(args.requests)]
    report = {"config": args.config, "args": vars(args), "host": cpu_name(),
              "cpus": os.cpu_count(), "startup_s": []}  # fmt: skip
    proc, url, log = None, args.url, None
    for i in range(0 if args.url else args.startups):
        if proc is not None:
            stop_server(proc)
        log = os.path.join(args.workdir, f"serve{i}.log")
        proc, url, seconds = start_server(path, args, log)
        report["startup_s"].append(round(seconds, 2))
        print(f"start-up {i + 1}: {seconds:.1f} s", flush=True)
    phases = {"start-up": compiles(log)}
    try:
        for i in range(args.warmup_rounds):  # untimed: programs compiled at first use
            asyncio.run(drive(url, prompts, args))
            phases[f"warm-up pass {i + 1}"] = compiles(log)
        alone = asyncio.run(
            drive(url, prompts[:1], argparse.Namespace(**{**vars(args), "concurrency": 1}))
        )
        phases["alone"] = compiles(log)
        report["alone"] = summarize(alone)
        ttft1, tpot1 = alone[0]["ttft"], alone[0]["tpot"] or 0.0
        report["ttft_bound_s"] = ttft1 + 2 * args.horizon * tpot1
        results = asyncio.run(drive(url, prompts, args))
        phases["timed"] = compiles(log)
        report["server"] = summarize(results)
        if args.log_compiles:
            report["compiles_after"] = phases
    finally:
        if proc is not None:
            stop_server(proc)
    if not args.no_offline and path is not None:
        off = offline(path, prompts, args)
        same = sum(r["tokens"] == t for r, t in zip(results, off.pop("tokens"), strict=True))
        report["offline"] = {**off, "same_tokens_as_server": same}
        report["server_vs_offline"] = report["server"]["output_tok_s"] / off["output_tok_s"]
    print_table(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


def print_table(report: dict) -> None:
    s = report["server"]
    print(f"server: {s['requests']} requests, {s['output_tokens']} tokens in {s['wall_s']:.1f} s"
          f" = {s['output_tok_s']:.1f} tok/s")  # fmt: skip
    print(f"  TTFT p50 {s['ttft_p50_s'] * 1e3:.0f} ms, p99 {s['ttft_p99_s'] * 1e3:.0f} ms "
          f"(one prefill + two horizons: {report['ttft_bound_s'] * 1e3:.0f} ms)")  # fmt: skip
    if s["tpot_p50_s"] is not None:
        print(f"  TPOT p50 {s['tpot_p50_s'] * 1e3:.1f} ms, p99 {s['tpot_p99_s'] * 1e3:.1f} ms")
    if "offline" in report:
        o = report["offline"]
        print(f"offline Model.generate: {o['output_tok_s']:.1f} tok/s; server / offline = "
              f"{report['server_vs_offline']:.2f}; same tokens for {o['same_tokens_as_server']}"
              f" of {s['requests']} requests")  # fmt: skip
    if report["startup_s"]:
        print(f"start-up: {', '.join(f'{t:.1f} s' for t in report['startup_s'])}")
    if "compiles_after" in report:
        print("programs the server compiled, in all, after each phase:", report["compiles_after"])


if __name__ == "__main__":
    sys.exit(main())
