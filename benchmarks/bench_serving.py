"""Serving latency and throughput: `bentoml serve` on localhost, adaptive batching vs none.

    .venv/bin/python benchmarks/bench_serving.py                    # tiny + resnet18, ~4 min on 2 cores
    .venv/bin/python benchmarks/bench_serving.py --presets tiny --concurrency 1,8 --requests 32
    .venv/bin/python benchmarks/bench_serving.py --bundle bundles/tiny --clips data/synth

For each bundle it starts `bentoml serve serving.service:DIMML` on a free 127.0.0.1 port twice:
batched (DIMML_MAX_BATCH_SIZE=--max-batch-size) and unbatched (DIMML_MAX_BATCH_SIZE=1, which
turns BentoML's adaptive batching off).
Each server gets a warm-up, then per concurrency level C a closed loop of C client threads sends
multipart POST /predict (field `video`, files read into memory beforehand) until --requests
requests (at least --min-rounds per thread) or --level-seconds have passed. Reported: p50/p99
latency and clips/s of the answered requests, failed requests, clips per model call and decode /
model time per clip from the server's /metrics, and the CPU that other processes used meanwhile
(a level is repeated, up to --tries, when that is above --busy-cores). Server logs are in --work.

Without --bundle, bundles are made with random weights (speed does not depend on them) by the
real `python -m export bundle`, and clips by training.synth: `tiny` gets the synth defaults
(128x96 15 fps 2 s), `resnet18` production-shaped clips (480x360 30 fps 3 s h264/aac, decoded to
3 s audio + 3 frames 224x224). Everything goes to --work (reused when given; else a temporary
folder, deleted). The client runs on the same cores as the server: on a 2-core machine its CPU
is part of what is measured.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CLASSES = ["class0", "class1", "class2", "class3"]
READY_TIMEOUT_S = 240
SERVICE = "serving.service:DIMML"


# ---------------------------------------------------------------------------------------
# what is measured on: bundles and clips (shared with bench_scoring.py)

@dataclass(frozen=True)
class ClipShape:
    """The media a benchmark feeds: training.synth clips of this size, rate, length, container."""

    width: int = 128
    height: int = 96
    fps: int = 15
    duration_s: float = 2.0
    format: str = "mp4"
    visual_noise: float = 0.5   # synth's per-pixel noise; high values make h264 bitrates unrealistic

    @property
    def key(self) -> str:
        return f"{self.width}x{self.height}_{self.fps}fps_{self.duration_s:g}s_{self.format}_vn{self.visual_noise:g}"

    def describe(self) -> str:
        return f"{self.width}x{self.height} {self.fps} fps {self.duration_s:g} s {self.format}"


# tiny: what the tiny preset is trained on (synth defaults); resnet18: production-shaped clips
# (CREMA-D is 480x360 30 fps, ~2.5 s); clean frames keep the h264 bitrate near a real video's
PRESET_CLIPS = {"tiny": ClipShape(),
                "resnet18": ClipShape(480, 360, 30, 3.0, "mp4", 0.0)}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def make_bundle(preset: str, work: Path) -> Path:
    """A bundle of `preset` with random weights, exported by the real CLI (reused if present)."""
    out = work / "bundles" / preset
    if (out / "manifest.json").is_file():
        return out
    import torch

    from dimml.modalities import preprocess_for
    from training.models import build_model, build_model_config
    from training.run import run_config_fields, save_run_model

    log(f"making a {preset} bundle (random weights) in {out}")
    torch.manual_seed(0)
    pre = preprocess_for(preset, "audio,visual")
    cfg = build_model_config(preset, len(CLASSES), pre)
    run = work / "runs" / preset
    save_run_model(run, {"method": "dimml", **run_config_fields(pre, cfg, CLASSES)}, build_model(cfg, pre))
    r = subprocess.run([sys.executable, "-m", "export", "bundle", "--run", str(run), "--out", str(out),
                        "--name", f"bench-{preset}", "--quiet", "--force"],
                       cwd=REPO, capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        raise RuntimeError(f"export of the {preset} bundle failed:\n{r.stderr[-3000:]}")
    return out


def make_clips(shape: ClipShape, count: int, work: Path) -> list[Path]:
    """`count` distinct synth clips of `shape` (reused if present), sorted by path."""
    from training.synth import SynthConfig, synthesize

    out = work / "clips" / shape.key / f"n{count}"
    per_class = -(-count // len(CLASSES))
    cfg = SynthConfig(classes=len(CLASSES), per_class=per_class, format=shape.format, width=shape.width,
                      height=shape.height, fps=shape.fps, duration_s=shape.duration_s,
                      visual_noise=shape.visual_noise)
    if not (out / "manifest.csv").is_file():
        log(f"writing {len(CLASSES) * per_class} synth clips {shape.describe()} to {out}")
    synthesize(out, cfg, workers=min(2, os.cpu_count() or 1), progress=False)
    return sorted(out.rglob(f"*.{shape.format}"))[:count]


def bundle_preset(bundle: Path) -> str | None:
    """The preset whose preprocessing the bundle uses (picks the synth clip shape), if any."""
    from dimml.bundle import load_bundle
    from dimml.modalities import preprocess_for
    from dimml.presets import PRESETS

    pre = load_bundle(str(bundle)).preprocess.input_dict()
    return next((k for k in PRESETS if preprocess_for(k, "audio,visual").input_dict() == pre), None)


def media_files(inputs: list[str]) -> list[Path]:
    """The media files of folders / files / manifests, as `python -m clients score` finds them."""
    from clients.inputs import find_jobs

    return [Path(j.files["video"]) for j in find_jobs(inputs, recursive=True)]


# ---------------------------------------------------------------------------------------
# how busy the machine was: CPU used by processes other than ours

def _busy_s() -> tuple[float, float]:
    """(CPU seconds all processes used, seconds the hypervisor took from this VM), summed over cores."""
    import psutil

    t = psutil.cpu_times()
    return (t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0),
            getattr(t, "steal", 0.0))


def _tree_cpu_s(pids: list[int]) -> float:
    """CPU seconds (all threads) of these live processes and their descendants."""
    import psutil

    procs: dict[int, psutil.Process] = {}
    for pid in pids:
        try:
            p = psutil.Process(pid)
            procs[p.pid] = p
            procs.update((c.pid, c) for c in p.children(recursive=True))
        except psutil.NoSuchProcess:
            pass
    total = 0.0
    for p in procs.values():
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


class CpuMonitor:
    """Over a measurement: load averages, our CPU and everyone else's (in cores).

    Ours = this process + the live process trees in `pids` + children waited for meanwhile;
    self = this process alone (bench_serving's HTTP client).
    """

    def __init__(self, pids: list[int] | None = None):
        self.pids = [os.getpid(), *(pids or [])]

    def __enter__(self) -> CpuMonitor:
        self.load_before = os.getloadavg()[0]
        self._t = time.monotonic()
        self._busy = _busy_s()
        self._ours = _tree_cpu_s(self.pids)
        self._kids = self._children_s()
        self._self = self._self_s()
        return self

    @staticmethod
    def _self_s() -> float:
        t = os.times()
        return t.user + t.system

    @staticmethod
    def _children_s() -> float:
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime

    def __exit__(self, *exc) -> None:
        wall = max(time.monotonic() - self._t, 1e-9)
        ours = _tree_cpu_s(self.pids) - self._ours + self._children_s() - self._kids
        busy, steal = _busy_s()
        self.ours_cores = ours / wall
        self.other_cores = max(0.0, (busy - self._busy[0]) - ours) / wall
        self.steal_cores = (steal - self._busy[1]) / wall
        self.self_cores = (self._self_s() - self._self) / wall
        self.load_after = os.getloadavg()[0]

    def summary(self) -> dict[str, float]:
        return {"load_before": round(self.load_before, 2), "load_after": round(self.load_after, 2),
                "ours_cores": round(self.ours_cores, 2), "other_cores": round(self.other_cores, 2),
                "steal_cores": round(self.steal_cores, 2), "self_cores": round(self.self_cores, 2)}


def measure_quietly(fn, pids: list[int] | None, busy_cores: float, tries: int):
    """fn() under a CpuMonitor; repeated (up to `tries` in all) while other processes used more
    than `busy_cores`. Returns (result, monitor summary + tries) of the quietest attempt."""
    best = None
    tries = max(1, tries)
    for attempt in range(1, tries + 1):
        with CpuMonitor(pids) as mon:
            result = fn()
        cpu = {**mon.summary(), "tries": attempt}
        if best is None or cpu["other_cores"] < best[1]["other_cores"]:
            best = (result, cpu)
        if cpu["other_cores"] <= busy_cores:
            break
        log(f"other processes used {cpu['other_cores']:.2f} cores (load {cpu['load_after']:.2f}): "
            + ("repeating" if attempt < tries else "keeping the quietest attempt"))
    best[1]["tries"] = attempt
    return best


# ---------------------------------------------------------------------------------------
# the server

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`bentoml serve SERVICE` on a free localhost port, in a new session; stopped on exit."""

    def __init__(self, bundle: Path, env: dict[str, str], work: Path, label: str, service: str = SERVICE):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = work / f"serve-{label}.log"
        home = work / "bentoml_home"
        home.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "BENTOML_HOME": str(home), "DIMML_BUNDLE": str(bundle.resolve()), **env}
        self.proc: subprocess.Popen | None = None
        self.target, self.cwd = service, REPO

    def start(self) -> Server:
        """Start and wait for /readyz; on failure the server is stopped and the error has its log."""
        import httpx

        with open(self.log_path, "wb") as logf:
            self.proc = subprocess.Popen([str(BIN / "bentoml"), "serve", self.target,
                                          "--host", "127.0.0.1", "--port", str(self.port)],
                                         cwd=self.cwd, env=self.env, stdout=logf, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        t0 = time.monotonic()
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"bentoml serve exited ({self.proc.returncode}):\n{self.tail()}")
                try:
                    if httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() - t0 > READY_TIMEOUT_S:
                    raise RuntimeError(f"server not ready in {READY_TIMEOUT_S} s:\n{self.tail()}")
                time.sleep(0.3)
        except BaseException:
            self.stop()
            raise
        self.ready_s = time.monotonic() - t0
        return self

    def __enter__(self) -> Server:
        return self if self.proc is not None else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def exceptions(self) -> Counter:
        """Exception lines of the server log (e.g. 'aiohttp...ServerDisconnectedError: ...'), counted."""
        text = self.log_path.read_text(errors="replace")
        return Counter(re.findall(r"^(?:[\w.]+\.)?\w*(?:Error|Exception)\b.*$", text, re.M))

    def stop(self) -> None:
        """SIGTERM the server (BentoML stops its workers); after 15 s SIGKILL whatever is left of its
        process group and of its process tree (BentoML's workers run in groups of their own)."""
        import psutil

        if self.proc is None:
            return
        try:
            tree = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = []
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)   # start_new_session: this group is the server's alone
        except (ProcessLookupError, PermissionError):
            pass
        for p in tree[1:]:
            try:
                p.kill()   # psutil checks the pid still names the same process (creation time)
            except psutil.NoSuchProcess:
                pass
        self.proc.wait(timeout=10)
        self.proc = None

    def metrics(self) -> dict[str, float]:
        """The /metrics sums this benchmark reports (summed over label sets)."""
        import httpx

        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        out: dict[str, float] = {}
        for name in ("dimml_inference_seconds_sum", "dimml_inference_seconds_count",
                     "dimml_decode_seconds_sum", "dimml_decode_seconds_count"):
            out[name] = sum(float(v) for v in re.findall(rf"^{name}(?:\{{[^}}]*\}})? (\S+)$", text, re.M))
        return out


# ---------------------------------------------------------------------------------------
# the load

@dataclass
class Level:
    """One concurrency level's figures."""

    concurrency: int
    requests: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    mean_ms: float = float("nan")
    clips_per_s: float = 0.0
    mean_batch: float = float("nan")      # clips per model call (server metrics)
    infer_ms_per_clip: float = float("nan")   # model time / clips (server)
    decode_ms: float = float("nan")       # decode time per upload (server, in its thread pool)
    cpu: dict[str, float] = field(default_factory=dict)
    cpu_ms_per_clip: dict[str, float] = field(default_factory=dict)   # CPU per answered clip, by process role


def role_cpu_s(server_pid: int) -> dict[str, float]:
    """CPU seconds (all threads) of the server's processes by role: `api` (the DIMML entry service:
    HTTP, multipart parsing, decoding, inter-service client), `inference` (DIMMLInference: batching,
    inter-service server, model) and `arbiter` (bentoml serve itself)."""
    import psutil

    out = {"api": 0.0, "inference": 0.0, "arbiter": 0.0}
    try:
        root = psutil.Process(server_pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return out
    for p in procs:
        try:
            cmd = " ".join(p.cmdline())
            t = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        role = ("inference" if "--service-name DIMMLInference" in cmd else
                "api" if "--service-name" in cmd else "arbiter")
        out[role] += t.user + t.system
    return out


def decode_only(files: list[Path], bundle: Path, threads: int, count: int) -> tuple[float, float]:
    """(clips/s, CPU ms per clip) of the server's own decode call (dimml.predict.decode_files with
    the bundle's preprocessing) over `count` files in a thread pool of `threads`, in this process."""
    from concurrent.futures import ThreadPoolExecutor

    from dimml.bundle import load_bundle
    from dimml.predict import decode_files

    cfg = load_bundle(str(bundle), checksums=False).preprocess
    jobs = [files[i % len(files)] for i in range(count)]
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda f: decode_files({"video": f}, cfg), jobs[:threads]))   # warm-up
        t0, c0 = time.perf_counter(), CpuMonitor._self_s()
        list(pool.map(lambda f: decode_files({"video": f}, cfg), jobs))
        return count / (time.perf_counter() - t0), 1000 * (CpuMonitor._self_s() - c0) / count


def _load(url: str, payloads: list[tuple[str, bytes]], concurrency: int, requests: int,
          max_s: float) -> tuple[list[float], Counter, float]:
    """A closed loop: `concurrency` threads each send /predict one after another until `requests`
    have been started or `max_s` has passed. Returns (latencies of 200s in s, errors, wall s)."""
    import httpx

    lock = threading.Lock()
    started = 0
    latencies: list[float] = []
    errors: Counter = Counter()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    t_start = time.perf_counter()
    deadline = t_start + max_s

    with httpx.Client(timeout=300, limits=limits) as client:
        def worker() -> None:
            nonlocal started
            while True:
                with lock:
                    if started >= requests or time.perf_counter() > deadline:
                        return
                    i, started = started, started + 1
                name, data = payloads[i % len(payloads)]
                t0 = time.perf_counter()
                try:
                    r = client.post(f"{url}/predict", files={"video": (name, data, "application/octet-stream")})
                    ok = r.status_code == 200
                    err = None if ok else f"http_{r.status_code}"
                except httpx.HTTPError as e:
                    ok, err = False, type(e).__name__
                dt = time.perf_counter() - t0
                with lock:
                    if ok:
                        latencies.append(dt)
                    else:
                        errors[err] += 1

        threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return latencies, errors, time.perf_counter() - t_start


def run_level(server: Server, payloads: list[tuple[str, bytes]], concurrency: int, requests: int,
              max_s: float, busy_cores: float, tries: int) -> Level:
    """One concurrency level, with the server's metric deltas over it."""
    def once():
        before, roles0, self0 = server.metrics(), role_cpu_s(server.proc.pid), CpuMonitor._self_s()
        lat, errors, wall = _load(server.url, payloads, concurrency, requests, max_s)
        after, roles1, self1 = server.metrics(), role_cpu_s(server.proc.pid), CpuMonitor._self_s()
        roles = {k: roles1[k] - roles0[k] for k in roles0}
        roles["client"] = self1 - self0
        return lat, errors, wall, {k: after[k] - before[k] for k in after}, roles

    (lat, errors, wall, m, roles), cpu = measure_quietly(once, [server.proc.pid], busy_cores, tries)
    lv = Level(concurrency, requests=len(lat) + sum(errors.values()), ok=len(lat), errors=dict(errors),
               wall_s=round(wall, 3), cpu=cpu)
    if lat:
        lv.cpu_ms_per_clip = {k: round(1000 * v / len(lat), 2) for k, v in roles.items()}
    if lat:
        ms = np.asarray(lat) * 1000
        lv.p50_ms, lv.p99_ms, lv.mean_ms = (float(np.percentile(ms, 50)), float(np.percentile(ms, 99)),
                                            float(ms.mean()))
        lv.clips_per_s = len(lat) / wall
    clips, calls = m["dimml_decode_seconds_count"], m["dimml_inference_seconds_count"]   # one decode per /predict
    if clips and calls:
        lv.mean_batch = clips / calls
        lv.infer_ms_per_clip = 1000 * m["dimml_inference_seconds_sum"] / clips
        lv.decode_ms = 1000 * m["dimml_decode_seconds_sum"] / clips
    return lv


@dataclass
class ServerRun:
    """One server (bundle x batching mode) and its levels."""

    label: str            # e.g. "tiny"
    mode: str             # "batched" | "unbatched"
    env: dict[str, str]
    ready_s: float = 0.0
    levels: list[Level] = field(default_factory=list)
    server_exceptions: dict[str, int] = field(default_factory=dict)   # exception line -> count


def bench_server(label: str, mode: str, bundle: Path, payloads: list[tuple[str, bytes]], env: dict[str, str],
                 args: argparse.Namespace, work: Path) -> ServerRun:
    run = ServerRun(label, mode, env)
    log(f"{label} {mode}: starting bentoml serve ({' '.join(f'{k}={v}' for k, v in env.items())})")
    server = Server(bundle, env, work, f"{label}-{mode}", args.service).start()
    with server:
        run.ready_s = round(server.ready_s, 1)
        log(f"{label} {mode}: ready in {server.ready_s:.1f} s at {server.url}; warming up")
        _load(server.url, payloads, min(4, max(args.concurrency)), args.warmup, 120)
        for c in args.concurrency:
            n = max(args.requests, args.min_rounds * c)
            lv = run_level(server, payloads, c, n, args.level_seconds, args.busy_cores, args.tries)
            log(f"{label} {mode} c={c}: {lv.ok}/{lv.requests} ok in {lv.wall_s:.1f} s, {lv.clips_per_s:.2f} clips/s, "
                f"p50 {lv.p50_ms:.0f} ms p99 {lv.p99_ms:.0f} ms, batch {lv.mean_batch:.1f}, "
                f"other CPU {lv.cpu['other_cores']:.2f} cores")
            if lv.errors:
                log(f"  failed: {lv.errors}")
            run.levels.append(lv)
        run.server_exceptions = dict(server.exceptions())
        if run.server_exceptions:
            log(f"{label} {mode}: exceptions in the server log ({server.log_path}): {run.server_exceptions}")
    return run


# ---------------------------------------------------------------------------------------
# report

def machine() -> str:
    """CPU model, cores, ONNX Runtime version: the facts a figure needs beside it."""
    model = "?"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    import onnxruntime

    return (f"{model}, {os.cpu_count()} cores, CPU only, onnxruntime {onnxruntime.__version__} "
            f"({', '.join(onnxruntime.get_available_providers())}), python {sys.version.split()[0]}")


def _f(x: float, fmt: str = ".0f") -> str:
    return "-" if x != x else format(x, fmt)


def table(runs: list[ServerRun]) -> str:
    """One row per (bundle, concurrency): batched and unbatched side by side, and their ratio."""
    rows = ["| bundle | clients | batched p50 / p99 ms | batched clips/s | unbatched p50 / p99 ms "
            "| unbatched clips/s | batched / unbatched clips/s | other CPU (cores) |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    by = {(r.label, r.mode): r for r in runs}
    failed = lambda x: f" ({sum(x.errors.values())} failed)" if x.errors else ""
    cells = lambda x: (f"{_f(x.p50_ms)} / {_f(x.p99_ms)}{failed(x)} | {_f(x.clips_per_s, '.1f')}"
                       if x else "- | -")
    for label in dict.fromkeys(r.label for r in runs):
        b, u = by.get((label, "batched")), by.get((label, "unbatched"))
        for i, lv in enumerate((b or u).levels):
            bl = b.levels[i] if b and i < len(b.levels) else None
            ul = u.levels[i] if u and i < len(u.levels) else None
            ratio = bl.clips_per_s / ul.clips_per_s if bl and ul and ul.clips_per_s else float("nan")
            other = max((x.cpu["other_cores"] for x in (bl, ul) if x), default=float("nan"))
            rows.append(f"| {label} | {lv.concurrency} | {cells(bl)} | {cells(ul)} | {_f(ratio, '.2f')} "
                        f"| {_f(other, '.2f')} |")
    return "\n".join(rows)


def breakdown(runs: list[ServerRun]) -> str:
    """Where the time goes, from the server's own metrics: decode and model time per clip."""
    rows = ["| bundle | mode | clients | clips per model call | decode ms/clip | model ms/clip "
            "| server + client CPU (cores) | of which client | load before / after |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in runs:
        for lv in r.levels:
            rows.append(f"| {r.label} | {r.mode} | {lv.concurrency} | {_f(lv.mean_batch, '.1f')} "
                        f"| {_f(lv.decode_ms, '.1f')} | {_f(lv.infer_ms_per_clip, '.1f')} "
                        f"| {_f(lv.cpu['ours_cores'], '.2f')} | {_f(lv.cpu['self_cores'], '.2f')} "
                        f"| {lv.cpu['load_before']:.2f} / {lv.cpu['load_after']:.2f} |")
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------
# main

def _ints(text: str) -> list[int]:
    values = [int(x) for x in text.split(",") if x.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive comma-separated integers, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, help="serve this bundle folder instead of making --presets bundles")
    p.add_argument("--clips", nargs="+", help="media files / folders to send (default: synth clips per preset)")
    p.add_argument("--presets", default="tiny,resnet18", help="bundles to make and serve (%(default)s)")
    p.add_argument("--num-clips", type=int, default=24, help="distinct synth clips, sent round-robin (%(default)s)")
    p.add_argument("--concurrency", type=_ints, default=[1, 4, 16, 32], help="client threads per level (1,4,16,32)")
    p.add_argument("--requests", type=int, default=48, help="requests per level (%(default)s) ...")
    p.add_argument("--min-rounds", type=int, default=3, help="... at least this many per client thread (%(default)s)")
    p.add_argument("--level-seconds", type=float, default=40.0,
                   help="stop starting requests of a level after this long (%(default)s)")
    p.add_argument("--warmup", type=int, default=8, help="unmeasured requests after start-up (%(default)s)")
    p.add_argument("--modes", default="batched,unbatched", help="servers to measure (%(default)s)")
    p.add_argument("--max-batch-size", type=int, default=32, help="DIMML_MAX_BATCH_SIZE when batched (%(default)s)")
    p.add_argument("--service", default=SERVICE,
                   help="what `bentoml serve` serves (%(default)s); another module needs PYTHONPATH via --env")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="extra server environment, e.g. DIMML_DECODE_THREADS=2 (repeatable)")
    p.add_argument("--busy-cores", type=float, default=0.3,
                   help="repeat a level when other processes used more CPU than this (%(default)s cores)")
    p.add_argument("--tries", type=int, default=3, help="attempts per level at most (%(default)s)")
    p.add_argument("--decode-threads", type=int, default=os.cpu_count() or 1,
                   help="decode-only baseline: thread pool size (%(default)s = the cores)")
    p.add_argument("--decode-count", type=int, default=96,
                   help="decode-only baseline: files decoded per measurement (%(default)s); 0 = skip it")
    p.add_argument("--work", type=Path, help="folder for bundles, clips, logs; reused (default: temporary)")
    p.add_argument("--json", type=Path, help="also write all figures here")
    return p


def ratio_table(runs: list[ServerRun], decode_cps: dict[str, list[float]], threads: int) -> str:
    """Serving clips/s as a ratio to decode-only clips/s (same run, same cores), and where each
    answered clip's CPU went, by process (server /metrics give decode and model time apart)."""
    rows = [f"| bundle | mode | clients | serving clips/s | decode-only clips/s ({threads} threads, before / after) "
            "| serving / decode-only | CPU ms per clip: client / API (decode) / inference (model) / arbiter |",
            "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for r in runs:
        base = decode_cps.get(r.label)
        if not base:
            continue
        mean = sum(base) / len(base)
        for lv in r.levels:
            c = lv.cpu_ms_per_clip
            rows.append(f"| {r.label} | {r.mode} | {lv.concurrency} | {lv.clips_per_s:.1f} | "
                        f"{mean:.1f} ({' / '.join(f'{b:.1f}' for b in base)}) | **{lv.clips_per_s / mean:.2f}** | "
                        f"{c.get('client', float('nan')):.1f} / {c.get('api', float('nan')):.1f} "
                        f"({_f(lv.decode_ms, '.1f')}) / {c.get('inference', float('nan')):.1f} "
                        f"({_f(lv.infer_ms_per_clip, '.1f')}) / {c.get('arbiter', float('nan')):.1f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not set(modes) <= {"batched", "unbatched"} or not modes:
        raise SystemExit(f"--modes: batched and/or unbatched, got {args.modes!r}")
    extra = dict(e.split("=", 1) for e in args.env)
    work = args.work or Path(tempfile.mkdtemp(prefix="dimml-bench-serving-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    runs: list[ServerRun] = []
    decode_cps: dict[str, list[float]] = {}   # label -> decode-only clips/s, before and after the servers
    decode_cpu_ms: dict[str, list[float]] = {}   # label -> decode-only CPU ms per clip, the same two
    try:
        if args.bundle:
            targets = [(args.bundle.name, args.bundle, bundle_preset(args.bundle))]
        else:
            targets = [(p, make_bundle(p, work), p) for p in args.presets.split(",") if p.strip()]
        shapes: dict[str, str] = {}
        for label, bundle, preset in targets:
            if args.clips:
                files = media_files(args.clips)
                shapes[label] = f"{len(files)} given files"
            else:
                shape = PRESET_CLIPS.get(preset or "resnet18", PRESET_CLIPS["resnet18"])
                files = make_clips(shape, args.num_clips, work)
                shapes[label] = f"{len(files)} synth clips {shape.describe()}"
            payloads = [(f.name, f.read_bytes()) for f in files]
            if args.decode_count:   # the baseline, in the same run on the same cores, before and after
                cps, cpu_ms = decode_only(files, bundle, args.decode_threads, args.decode_count)
                decode_cps[label], decode_cpu_ms[label] = [cps], [cpu_ms]
                log(f"{label}: decode-only {cps:.1f} clips/s, {cpu_ms:.1f} CPU ms/clip ({args.decode_threads} threads)")
            for mode in modes:
                env = {**extra, "DIMML_MAX_BATCH_SIZE": str(args.max_batch_size if mode == "batched" else 1)}
                runs.append(bench_server(label, mode, bundle, payloads, env, args, work))
            if args.decode_count:
                cps, cpu_ms = decode_only(files, bundle, args.decode_threads, args.decode_count)
                decode_cps[label].append(cps)
                decode_cpu_ms[label].append(cpu_ms)
                log(f"{label}: decode-only {cps:.1f} clips/s, {cpu_ms:.1f} CPU ms/clip after the servers")
    finally:
        if args.json and runs:
            args.json.write_text(json.dumps({"machine": machine(), "decode_only_clips_per_s": decode_cps,
                                             "decode_only_cpu_ms_per_clip": decode_cpu_ms,
                                             "runs": [asdict(r) for r in runs]}, indent=1))
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)

    print(f"\n## Serving: /predict over localhost ({time.strftime('%Y-%m-%d')})\n")
    print(f"machine: {machine()}")
    print("clips: " + "; ".join(f"{k}: {v}" for k, v in shapes.items()))
    print(f"requests per level: max({args.requests}, {args.min_rounds} x clients), at most "
          f"{args.level_seconds:g} s; batched = DIMML_MAX_BATCH_SIZE={args.max_batch_size}, unbatched = 1"
          + (f"; env {extra}" if extra else "") + f"; total {time.monotonic() - t0:.0f} s\n")
    print(table(runs))
    print()
    print(breakdown(runs))
    if decode_cps:
        print()
        print(ratio_table(runs, decode_cps, args.decode_threads))
        print("\ndecode-only CPU ms per clip (before / after): " + "; ".join(
            f"{k}: {' / '.join(f'{v:.1f}' for v in vs)}" for k, vs in decode_cpu_ms.items()))
    for r in runs:
        if r.server_exceptions:
            print(f"\n{r.label} {r.mode}: server log exceptions: "
                  + "; ".join(f"{n} x {e}" for e, n in r.server_exceptions.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
