"""Load benchmark: the running service under 50 concurrent pollers of GET /product/{id} plus 5 uploads a second.

The service runs as a real process (uvicorn, embedded SQLite and storage folder, its in-process worker) with the
Reve and NanoBanana fakes as provider stand-ins of realistic latency, each in its own process. In the same run, a
bare FastAPI endpoint returning the same JSON is driven by the same pollers, so throughput is a ratio measured side by
side.

    python bench/load.py [--seconds 60] [--pollers 50] [--uploads-per-s 5]

Prints: errors (target 0), p50/p99 latency of the polls (target p99 <= 100 ms), the service's peak memory, and the
throughput of GET /product/{id} as a ratio to the bare endpoint.

Under load each poller polls like a frontend, once every --poll-interval-s (1 s; the upload page polls every 1.5 s).
Throughput is measured after the load, with the pollers back to back, against the same database served by a process
without a worker (so the queue the load left behind is not being worked on) and against the bare endpoint, alternated.
Back to back, latency is just pollers / throughput (Little's law) for both, and this machine's one load generator
shares the cores with the server and may itself be the limit; so the server's CPU time per poll is printed too, and
its ratio (bare / service) is the throughput ratio one core would give.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.service_process import ServiceProcess, free_port  # noqa: E402

PHOTO = (REPO.parent / "shared" / "samples" / "04_pearl_stud_earrings_white_sweep_photo.jpg").read_bytes()
BARE_APP = '''
import json, os
from fastapi import FastAPI
from fastapi.responses import JSONResponse
BODY = json.loads(open(os.environ["BARE_BODY"]).read())
app = FastAPI()
@app.get("/product/{product_id}")
async def product(product_id: str) -> JSONResponse:
    return JSONResponse(BODY)
@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}
'''


@dataclass
class Stats:
    latencies_ms: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    uploads: int = 0
    cpu_s: float = 0.0  # CPU time the server spent meanwhile

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1


def start_fake(module: str, *args: str) -> tuple[subprocess.Popen[bytes], str]:
    process = subprocess.Popen([sys.executable, "-m", f"tests.fakes.{module}", "--port", "0", *args], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert process.stdout is not None
    line = process.stdout.readline().decode()
    if not line.startswith("READY "):
        raise RuntimeError(f"{module} fake did not start: {line!r}")
    return process, line.split()[1]


def configure(base_url: str, body: dict[str, object]) -> None:
    httpx.post(f"{base_url}/__admin/configure", json=body, timeout=10).raise_for_status()


def seed_products(base_url: str, count: int) -> list[str]:
    """Upload ``count`` photos before the run, so the pollers have products to read from the first second."""
    return [httpx.post(f"{base_url}/process", files={"file": ("p.jpg", PHOTO, "image/jpeg")},
                       timeout=30).json()["product_id"] for _ in range(count)]


def start_bare(tmp: Path, base_url: str, product_id: str, port: int) -> subprocess.Popen[bytes]:
    """The bare FastAPI endpoint, serving the JSON of one of the service's product rows, as its own process."""
    (tmp / "body.json").write_text(json.dumps(httpx.get(f"{base_url}/product/{product_id}").json()))
    (tmp / "bare_app.py").write_text(BARE_APP)
    return subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "bare_app:app", "--port", str(port), "--log-level", "warning"],
        cwd=tmp, env={**os.environ, "BARE_BODY": str(tmp / "body.json")},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def count_done(base_url: str, ids: list[str]) -> int:
    return sum(httpx.get(f"{base_url}/product/{product_id}").json()["status"] == "done" for product_id in ids)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def poller(client: httpx.AsyncClient, ids: list[str], stats: Stats, stop: asyncio.Event,
                 interval_s: float) -> None:
    """Poll like a frontend: one GET every ``interval_s`` (0: back to back, to measure throughput)."""
    await asyncio.sleep(random.uniform(0, interval_s))  # frontends are not in step
    while not stop.is_set():
        started = time.perf_counter()
        try:
            response = await client.get(f"/product/{random.choice(ids)}")
            if response.status_code != 200:
                stats.error(f"HTTP {response.status_code}")
            else:
                stats.latencies_ms.append((time.perf_counter() - started) * 1000)
        except httpx.HTTPError as exc:
            stats.error(type(exc).__name__)
        await asyncio.sleep(max(0.0, interval_s - (time.perf_counter() - started)))


async def uploader(client: httpx.AsyncClient, per_s: float, ids: list[str], stats: Stats,
                   stop: asyncio.Event) -> None:
    async def one() -> None:
        try:
            response = await client.post("/process", files={"file": ("p.jpg", PHOTO, "image/jpeg")})
            if response.status_code != 202:
                stats.error(f"upload HTTP {response.status_code}")
                return
            ids.append(response.json()["product_id"])
            stats.uploads += 1
        except httpx.HTTPError as exc:
            stats.error(f"upload {type(exc).__name__}")

    tasks = set()
    next_at = time.perf_counter()
    while not stop.is_set():
        task = asyncio.create_task(one())
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        next_at += 1 / per_s
        await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
    await asyncio.gather(*tasks)


async def drive(base_url: str, ids: list[str], seconds: float, pollers: int, uploads_per_s: float,
                interval_s: float) -> Stats:
    stats = Stats()
    stop = asyncio.Event()
    limits = httpx.Limits(max_connections=pollers + 20, max_keepalive_connections=pollers + 20)
    async with httpx.AsyncClient(base_url=base_url, timeout=30, limits=limits) as client:
        tasks = [asyncio.create_task(poller(client, ids, stats, stop, interval_s)) for _ in range(pollers)]
        if uploads_per_s > 0:
            tasks.append(asyncio.create_task(uploader(client, uploads_per_s, ids, stats, stop)))
        await asyncio.sleep(seconds)
        stop.set()
        await asyncio.gather(*tasks)
    return stats


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] if ordered else float("nan")


async def run(args: argparse.Namespace) -> None:
    fakes: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmp:
        reve, reve_url = start_fake("reve")
        nano, nano_url = start_fake("nanobanana")
        fakes += [reve, nano]
        # Realistic latencies (PROVIDERS.md: Reve 7-26 s per edit, NanoBanana 15-20 s), scaled to fit the run.
        configure(reve_url, {"latency_s": args.cutout_s, "credits": 10_000_000})
        configure(nano_url, {"generation_s": args.variant_s})
        env = {
            "DATA_DIR": f"{tmp}/data",
            "REVE_API_KEY": "papi.test-key", "REVE_BASE_URL": reve_url,
            "NANOBANA_API_KEY": "nb-test-key", "NANOBANA_BASE_URL": nano_url,
            "NANOBANA_POLL_INTERVAL_SECONDS": "2", "RATE_LIMIT_PER_MINUTE": "0", "LOG_LEVEL": "WARNING",
            "WORKER_CONCURRENCY": str(args.worker_concurrency),
        }
        service = ServiceProcess(env, log_path=Path(tmp) / "service.log").start()
        reader: ServiceProcess | None = None
        bare_port = free_port()
        try:
            ids = await asyncio.to_thread(seed_products, service.base_url, 10)
            fakes.append(await asyncio.to_thread(start_bare, Path(tmp), service.base_url, ids[0], bare_port))
            print(f"service under load: {args.pollers} pollers (each every {args.poll_interval_s:g} s) + "
                  f"{args.uploads_per_s} uploads/s for "
                  f"{args.seconds:.0f} s (cut-out {args.cutout_s} s, variants {args.variant_s} s)")
            loaded = await drive(service.base_url, ids, args.seconds, args.pollers, args.uploads_per_s,
                                 args.poll_interval_s)
            peak = peak_rss_mib(service.process.pid if service.process else 0)
            done = await asyncio.to_thread(count_done, service.base_url, ids[-50:])
            await asyncio.to_thread(service.stop)
            # Throughput, side by side: the same pollers back to back against the same database (hundreds of rows
            # now) served by a process without a worker, and against the bare endpoint; alternated, so drift in
            # the machine's load falls on both.
            reader = ServiceProcess({**env, "RUN_WORKER": "false"}, log_path=Path(tmp) / "reader.log")
            await asyncio.to_thread(reader.start)
            await wait_ready(f"http://127.0.0.1:{bare_port}")
            service_only, bare_only = Stats(), Stats()
            assert reader.process is not None
            sides = ((reader.base_url, reader.process.pid, service_only),
                     (f"http://127.0.0.1:{bare_port}", fakes[-1].pid, bare_only))
            for _ in range(2):
                for target, pid, stats in sides:
                    before = cpu_seconds(pid)
                    measured = await drive(target, ids, args.compare_seconds / 2, args.pollers, 0, 0)
                    stats.cpu_s += cpu_seconds(pid) - before
                    stats.latencies_ms += measured.latencies_ms
                    for what, count in measured.errors.items():
                        stats.errors[what] = stats.errors.get(what, 0) + count
        finally:
            service.stop()
            if reader is not None:
                reader.stop()
            for process in fakes:
                process.terminate()
                process.wait(10)

    polls = len(loaded.latencies_ms)
    print(f"errors: {sum(loaded.errors.values())} {loaded.errors or ''}  (target 0)")
    print(f"GET /product/{{id}} under load: {polls} polls, {polls / args.seconds:.0f}/s, "
          f"p50 {statistics.median(loaded.latencies_ms):.1f} ms, p99 {percentile(loaded.latencies_ms, 0.99):.1f} ms"
          f"  (target p99 <= 100 ms)")
    print(f"uploads accepted: {loaded.uploads} ({loaded.uploads / args.seconds:.1f}/s); "
          f"of the last 50, {done} already done when the run ended")
    print(f"service peak memory (VmHWM): {peak:.0f} MiB")
    service_rps = len(service_only.latencies_ms) / args.compare_seconds
    bare_rps = len(bare_only.latencies_ms) / args.compare_seconds
    compare_errors = sum(service_only.errors.values()) + sum(bare_only.errors.values())
    print(f"throughput, polls only, back to back, {args.compare_seconds:.0f} s each (alternated): service "
          f"{service_rps:.0f}/s (p50 {statistics.median(service_only.latencies_ms):.0f} ms), bare FastAPI "
          f"{bare_rps:.0f}/s (p50 {statistics.median(bare_only.latencies_ms):.0f} ms), "
          f"ratio {service_rps / bare_rps:.2f}; errors {compare_errors}")
    service_cpu_ms = 1000 * service_only.cpu_s / max(1, len(service_only.latencies_ms))
    bare_cpu_ms = 1000 * bare_only.cpu_s / max(1, len(bare_only.latencies_ms))
    print(f"server CPU per poll: service {service_cpu_ms:.2f} ms, bare FastAPI {bare_cpu_ms:.2f} ms, "
          f"throughput ratio by CPU cost {bare_cpu_ms / service_cpu_ms:.2f} (what one core would serve, side by side)")


async def wait_ready(base_url: str) -> None:
    async with httpx.AsyncClient() as client:
        for _ in range(100):
            try:
                if (await client.get(f"{base_url}/health")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError("the bare app did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--compare-seconds", type=float, default=10)
    parser.add_argument("--pollers", type=int, default=50)
    parser.add_argument("--poll-interval-s", type=float, default=1.0,
                        help="each poller's period under load, like a frontend's (the upload page polls every 1.5 s)")
    parser.add_argument("--uploads-per-s", type=float, default=5)
    parser.add_argument("--cutout-s", type=float, default=3.0)
    parser.add_argument("--variant-s", type=float, default=8.0)
    parser.add_argument("--worker-concurrency", type=int, default=8)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
