"""The served studio under load: N concurrent clients, Gradio API and REST mixed, Stops and model switches mixed in;
then 20 load/unload cycles.

The server is `launch.py --api` in a subprocess on 127.0.0.1 (a free port), with its outputs/ and models/ in a temp
folder: models/ holds a copy of the model, so that switching has two to go between. Its RSS is that process's own
(psutil); the clients run in this process and are not in it.

Phase 1, for `--duration` seconds (and at most `--max-requests`): half the clients use gradio_client (`/txt2img`,
`/stop` with the job id a generation returns first, `/load_model`), half the REST API (`/sdapi/v1/txt2img` with
`save_images`, `/sdapi/v1/interrupt`, `POST /sdapi/v1/options {"sd_model_checkpoint"}`), one request at a time each.
Prints per client the requests finished, p50/p95 latency, errors; fairness (min/max finished per client, the longest
wait); the images returned against those asked (a stopped generation may return fewer, counted apart); the finished
images against the files in outputs/; the server's RSS at the start and the end.

Phase 2: 20 cycles of REST switch to the copy + a generation, Gradio unload + load of the model + a generation; the
RSS after each, first / last / max, and end / start (goal: within 5%).

    python -m bench.load [--clients 4] [--duration 120] [--model embedded|tiny]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import requests
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
REQUEST_TIMEOUT_S = 300      # a request that takes longer counts as stuck (an error)
READY_TIMEOUT_S = 300
MB = 1024 ** 2
PROMPTS = {"embedded": ["grinning face", "red heart", "smiling cat", "thumbs up", "party popper"],
           "tiny": ["red apple", "a cat", "blue sky", "smiling face", "a dog"]}
STOPPED = re.compile(r"Stopped|Interrupted")


# ----------------------------------------------------------------------------- the server, in a subprocess


def serve(port: int, outputs: str, models_dir: str, model: str) -> None:
    """`python launch.py --api` with models/ in the bench's temp folder; serves until stdin closes."""
    import launch

    args = launch.parse_args(["--model", model, "--port", str(port), "--outputs", outputs, "--api"])
    app, context = launch.build(args)
    context.models.models_dir = Path(models_dir)
    launch.start(app, context, args)
    sys.stdin.read()          # EOF: the bench is done (or gone)
    app.close()


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    outputs: Path
    models: tuple[str, str]          # the two checkpoints to switch between (REST titles) ...
    gradio_specs: dict[str, tuple[str, str]]   # ... and, for Gradio's /load_model, (model, hub_id_or_path)
    log: Path

    def rss(self) -> int:
        return psutil.Process(self.process.pid).memory_info().rss

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(temp: Path, model: str) -> Server:
    outputs, models = temp / "outputs", temp / "models"
    outputs.mkdir()
    models.mkdir()
    if model == "tiny":
        from recipe.tiny import build_tiny_pipeline
        build_tiny_pipeline(temp / "tiny-build").save_pretrained(models / "tiny-a", safe_serialization=True)
        shutil.copytree(models / "tiny-a", models / "tiny-b")
        launched, names = str(models / "tiny-a"), ("tiny-a", "tiny-b")
        gradio_specs = {"tiny-a": ("embedded", str(models / "tiny-a")), "tiny-b": ("embedded", str(models / "tiny-b"))}
    else:
        from pipelines.models.sources import EMBEDDED_MODEL, EMBEDDED_NAME
        shutil.copytree(EMBEDDED_MODEL, models / "emoji-ldm-copy")
        launched, names = EMBEDDED_NAME, (EMBEDDED_NAME, "emoji-ldm-copy")
        gradio_specs = {EMBEDDED_NAME: (EMBEDDED_NAME, ""), "emoji-ldm-copy": (EMBEDDED_NAME, str(models / "emoji-ldm-copy"))}
    port = free_port()
    log = temp / "server.log"
    env = os.environ | {"GRADIO_TEMP_DIR": str(temp / "gradio-server"), "GRADIO_ANALYTICS_ENABLED": "False",
                        "HF_HUB_OFFLINE": "1"}
    with log.open("w") as log_file:
        process = subprocess.Popen([sys.executable, "-m", "bench.load", "--serve", str(port), str(outputs), str(models),
                                    launched], cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=log_file,
                                   stderr=subprocess.STDOUT)
    server = Server(process, f"http://127.0.0.1:{port}/", outputs, names, gradio_specs, log)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"The server ended (exit {process.returncode}) before serving:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(server.url + "sdapi/v1/options", timeout=5).ok:
                return server
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"The server did not answer within {READY_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


# ----------------------------------------------------------------------------- one request, through either API


@dataclass
class Outcome:
    kind: str                        # generate | stop | switch | unload | load
    latency: float
    asked: int = 0                   # images asked for
    returned: int = 0                # images returned
    finished_seeds: list[int] = field(default_factory=list)   # returned images that finished (and were saved)
    stopped: bool = False
    error: str | None = None


def _seeds_of_finished(infotexts: list[str]) -> list[int]:
    return [int(re.search(r"Seed: (\d+)", text).group(1)) for text in infotexts if "Stopped at step" not in text]


class RestClient:
    api = "REST"

    def __init__(self, server: Server, downloads: Path):
        self.server, self.session = server, requests.Session()

    def _post(self, path: str, body: dict) -> dict:
        answer = self.session.post(self.server.url + "sdapi/v1/" + path, json=body, timeout=REQUEST_TIMEOUT_S)
        if not answer.ok:
            raise RuntimeError(f"{path}: HTTP {answer.status_code}: {answer.text[:300]}")
        return answer.json()

    def generate(self, *, prompt: str, seed: int, steps: int, batch_size: int, batch_count: int,
                 stop_after: float | None = None) -> Outcome:
        body = {"prompt": prompt, "seed": seed, "steps": steps, "batch_size": batch_size, "n_iter": batch_count,
                "sampler_name": "Euler a", "save_images": True}
        started = time.perf_counter()
        if stop_after is None:
            answer = self._post("txt2img", body)
        else:           # A1111's interrupt stops the REST API's current generation (whichever client's)
            holder: dict = {}
            worker = threading.Thread(target=lambda: holder.update(answer=self._call(self._post, "txt2img", body)))
            worker.start()
            time.sleep(stop_after)
            self._post("interrupt", {})
            worker.join()
            answer = holder["answer"]
            if isinstance(answer, Exception):
                raise answer
        info = json.loads(answer["info"])
        images = [Image.open(io.BytesIO(base64.b64decode(data))) for data in answer["images"]]
        if any(image.size[0] < 8 for image in images):
            raise RuntimeError(f"an image came back {images[0].size}")
        return Outcome("stop" if stop_after is not None else "generate", time.perf_counter() - started,
                       asked=batch_size * batch_count, returned=len(images),
                       finished_seeds=_seeds_of_finished(info["infotexts"]),
                       stopped=any(STOPPED.search(message) for message in info["messages"]))

    @staticmethod
    def _call(function, *args):
        try:
            return function(*args)
        except Exception as error:
            return error

    def current_model(self) -> str:
        return self.session.get(self.server.url + "sdapi/v1/options", timeout=30).json()["sd_model_checkpoint"]

    def switch(self, name: str) -> Outcome:
        started = time.perf_counter()
        self._post("options", {"sd_model_checkpoint": name})
        return Outcome("switch", time.perf_counter() - started)


class GradioClient:
    api = "Gradio"

    def __init__(self, server: Server, downloads: Path):
        from gradio_client import Client
        self.server = server
        self.client = Client(server.url, verbose=False, download_files=str(downloads))

    def generate(self, *, prompt: str, seed: int, steps: int, batch_size: int, batch_count: int,
                 stop_after: float | None = None) -> Outcome:
        started = time.perf_counter()
        job = self.client.submit(prompt=prompt, seed=seed, steps=steps, batch_size=batch_size, batch_count=batch_count,
                                 sampler="Euler a", preview_every=0, api_name="/txt2img")
        if stop_after is not None:
            job_id = next(iter(job))[3]        # the job's id comes first, while it waits or runs
            time.sleep(stop_after)
            self.client.predict(job_id=job_id, api_name="/stop")
        gallery, _, status, *_ = job.result(timeout=REQUEST_TIMEOUT_S)
        if not isinstance(gallery, list):     # stopped before it started: the gallery was left as it was
            gallery = []
        for item in gallery:
            Image.open(item["image"]).load()
        finished = [int(item["caption"].split()[1]) for item in gallery if item["caption"].startswith("seed ")]
        return Outcome("stop" if stop_after is not None else "generate", time.perf_counter() - started,
                       asked=batch_size * batch_count, returned=len(gallery), finished_seeds=finished,
                       stopped=bool(STOPPED.search(status)))

    def switch(self, name: str) -> Outcome:
        started = time.perf_counter()
        model, path = self.server.gradio_specs[name]
        self.client.predict(model=model, hub_id_or_path=path, api_name="/load_model")
        return Outcome("switch", time.perf_counter() - started)

    def unload(self) -> Outcome:
        started = time.perf_counter()
        self.client.predict(api_name="/unload_model")
        return Outcome("unload", time.perf_counter() - started)


# ----------------------------------------------------------------------------- phase 1: concurrent clients


@dataclass
class ClientRun:
    name: str
    api: str
    outcomes: list[Outcome] = field(default_factory=list)


def run_client(index: int, client, rest: RestClient, prompts: list[str], deadline: float, max_requests: int,
               run: ClientRun) -> None:
    """One client, one request at a time until the deadline: mostly generations, some stopped, a few switches."""
    rng = random.Random(index)
    for number in range(max_requests):
        if time.monotonic() >= deadline:
            return
        roll = rng.random()
        seed = 1_000_000 * (index + 1) + 10 * number     # batches of up to 4 images: seeds never collide
        try:
            if roll < 0.08:
                others = [name for name in client.server.models if name != rest.current_model()]
                outcome = client.switch(others[0] if others else client.server.models[0])
            elif roll < 0.25:
                outcome = client.generate(prompt=rng.choice(prompts), seed=seed, steps=20, batch_size=2,
                                          batch_count=2, stop_after=rng.uniform(0.05, 0.8))
            else:
                outcome = client.generate(prompt=rng.choice(prompts), seed=seed, steps=rng.randint(6, 16),
                                          batch_size=rng.choice((1, 2)), batch_count=rng.choice((1, 1, 2)))
        except Exception as error:
            outcome = Outcome("error", 0.0, error=f"{type(error).__name__}: {error}"[:400])
        run.outcomes.append(outcome)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def saved_seeds(outputs: Path) -> Counter:
    return Counter(int(path.stem.split("-", 1)[1]) for path in outputs.rglob("*.png"))


def load_phase(server: Server, args, temp: Path) -> Counter:
    prompts = PROMPTS[args.model]
    rest = RestClient(server, temp)
    clients = []
    for index in range(args.clients):
        kind = GradioClient if index % 2 == 0 else RestClient
        clients.append(kind(server, temp / "downloads" / f"client-{index}"))
    # warm-up, not counted: one generation through each API
    expected = Counter()
    for seed, client in enumerate(clients[:2], start=1):
        expected.update(client.generate(prompt=prompts[0], seed=seed, steps=6, batch_size=1, batch_count=1).finished_seeds)
    time.sleep(2)
    rss_start = server.rss()
    runs = [ClientRun(f"client {index}", client.api) for index, client in enumerate(clients)]
    deadline = time.monotonic() + args.duration
    rss_samples = [rss_start]
    sampling = threading.Event()

    def sample_rss():
        while not sampling.wait(1.0):
            rss_samples.append(server.rss())

    sampler = threading.Thread(target=sample_rss, daemon=True)
    sampler.start()
    threads = [threading.Thread(target=run_client, args=(index, client, rest, prompts, deadline,
                                                         args.max_requests // args.clients, run))
               for index, (client, run) in enumerate(zip(clients, runs))]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    sampling.set()
    sampler.join()
    time.sleep(2)
    rss_end = server.rss()
    progress = requests.get(server.url + "sdapi/v1/progress", timeout=30).json()
    report_load(server, args, runs, elapsed, expected, rss=(rss_start, rss_end, max(rss_samples)),
                device_job=progress["state"]["job_id"])
    return expected


def report_load(server: Server, args, runs: list[ClientRun], elapsed: float, expected: Counter, *,
                rss: tuple[int, int, int], device_job: str | None) -> None:
    """Phase 1's figures, per client and in all; `expected` gains the finished images' seeds."""
    rss_start, rss_end, rss_max = rss
    print(f"\nPhase 1: {args.clients} clients for {elapsed:.0f} s ({args.duration:.0f} s asked, then the requests in "
          f"flight), model {args.model} ({' <-> '.join(server.models)})")
    print(f"{'client':<10}{'API':<8}{'done':>6}{'gen':>6}{'stop':>6}{'switch':>7}{'errors':>7}"
          f"{'p50 s':>8}{'p95 s':>8}{'max s':>8}{'images ret/asked':>18}{'stopped: ret/asked':>20}")
    all_latencies, errors, finished_per_client = [], [], []
    lost = 0
    for run in runs:
        done = [o for o in run.outcomes if o.error is None]
        generations = [o for o in done if o.kind in ("generate", "stop") and not o.stopped]
        stopped = [o for o in done if o.kind in ("generate", "stop") and o.stopped]
        latencies = [o.latency for o in generations]
        all_latencies += [o.latency for o in done]
        errors += [(run.name, o.error) for o in run.outcomes if o.error is not None]
        lost += sum(o.asked - o.returned for o in generations)
        for outcome in done:
            expected.update(outcome.finished_seeds)
        finished_per_client.append(len(done))
        print(f"{run.name:<10}{run.api:<8}{len(done):>6}{len(generations):>6}{len(stopped):>6}"
              f"{sum(o.kind == 'switch' for o in done):>7}{len(run.outcomes) - len(done):>7}"
              f"{percentile(latencies, 50):>8.2f}{percentile(latencies, 95):>8.2f}"
              f"{max(latencies, default=float('nan')):>8.2f}"
              f"{sum(o.returned for o in generations):>10}/{sum(o.asked for o in generations):<7}"
              f"{sum(o.returned for o in stopped):>12}/{sum(o.asked for o in stopped):<7}")
    every = [o for run in runs for o in run.outcomes if o.error is None and o.kind in ("generate", "stop")
             and not o.stopped]
    print(f"{'all':<18}{sum(finished_per_client):>6}{len(every):>6}   generation latency p50 "
          f"{percentile([o.latency for o in every], 50):.2f} s, p95 {percentile([o.latency for o in every], 95):.2f} s; "
          f"{sum(finished_per_client) / elapsed:.2f} requests/s")
    switches = [o.latency for run in runs for o in run.outcomes if o.kind == "switch" and o.error is None]
    if switches:
        print(f"model switches: {len(switches)}, median {percentile(switches, 50):.2f} s, max {max(switches):.2f} s")
    stops = [o for run in runs for o in run.outcomes if o.kind == "stop" and o.error is None]
    print(f"Stops asked: {len(stops)}; generations stopped: "
          f"{sum(o.stopped for run in runs for o in run.outcomes if o.error is None)} (a REST interrupt stops the REST "
          f"API's current generation, which may be another REST client's)")
    low, high = min(finished_per_client), max(finished_per_client)
    print(f"fairness: requests done per client min/max = {low}/{high} = {low / high if high else 0:.2f}; longest wait "
          f"of any request {max(all_latencies, default=0):.2f} s (p95 {percentile(all_latencies, 95):.2f} s); "
          f"{'no client starved' if low > 0 else 'A CLIENT STARVED'}")
    print(f"errors: {len(errors)}")
    for name, message in errors[:20]:
        print(f"  {name}: {message}")
    print(f"lost images (finished generations, asked - returned): {lost}")
    on_disk = saved_seeds(server.outputs)
    print(f"finished images returned (warm-up included) {sum(expected.values())}, files in outputs/ {sum(on_disk.values())}: "
          f"{'they match, seed by seed' if on_disk == expected else f'MISMATCH: missing {sorted((expected - on_disk).elements())[:10]}, extra {sorted((on_disk - expected).elements())[:10]}'}")
    print(f"after the load: device job now {device_job or 'none (idle)'}")
    print(f"server RSS (the server process): start {rss_start / MB:.0f} MB, end {rss_end / MB:.0f} MB, max during "
          f"{rss_max / MB:.0f} MB; end / start = {rss_end / rss_start:.3f}")


# ----------------------------------------------------------------------------- phase 2: load/unload cycles


def cycles_phase(server: Server, args, temp: Path, expected: Counter) -> None:
    prompts = PROMPTS[args.model]
    rest, gradio = RestClient(server, temp), GradioClient(server, temp / "downloads" / "cycles")
    first, copy = server.models
    if rest.current_model() != first:
        gradio.switch(first)

    def cycle(number: int) -> list[Outcome]:
        seed = 9_000_000 + 10 * number
        return [rest.switch(copy),
                rest.generate(prompt=prompts[number % len(prompts)], seed=seed, steps=8, batch_size=1, batch_count=1),
                gradio.unload(), gradio.switch(first),
                gradio.generate(prompt=prompts[number % len(prompts)], seed=seed + 1, steps=8, batch_size=1,
                                batch_count=1)]

    for outcome in cycle(0):            # warm-up: the copy's first load, not counted
        expected.update(outcome.finished_seeds)
    time.sleep(2)
    rss_start = server.rss()
    rss, lost, errors = [], 0, []
    print(f"\nPhase 2: {args.cycles} cycles of [REST switch to {copy} + a generation, Gradio unload + load {first} + a "
          f"generation]; server RSS after each")
    for number in range(1, args.cycles + 1):
        try:
            outcomes = cycle(number)
        except Exception as error:
            errors.append(f"cycle {number}: {type(error).__name__}: {error}"[:400])
            outcomes = []
        for outcome in outcomes:
            expected.update(outcome.finished_seeds)
            lost += outcome.asked - outcome.returned
        time.sleep(1)
        rss.append(server.rss())
        print(f"  cycle {number:>2}: {rss[-1] / MB:7.0f} MB  ({(rss[-1] - rss_start) / MB:+.0f} MB, "
              f"{sum(o.latency for o in outcomes):.1f} s)")
    ratio = rss[-1] / rss_start
    print(f"RSS before cycle 1 {rss_start / MB:.0f} MB; after cycle 1 {rss[0] / MB:.0f} MB, after the last "
          f"{rss[-1] / MB:.0f} MB, max {max(rss) / MB:.0f} MB")
    print(f"end / start = {ratio:.3f} (last / first cycle {rss[-1] / rss[0]:.3f}): goal within 5%: "
          f"{'met' if abs(ratio - 1) <= 0.05 else 'NOT met'}")
    print(f"errors: {len(errors)}; lost images: {lost}")
    for message in errors:
        print(f"  {message}")
    on_disk = saved_seeds(server.outputs)
    print(f"finished images (both phases) {sum(expected.values())}, files in outputs/ {sum(on_disk.values())}: "
          f"{'they match, seed by seed' if on_disk == expected else 'MISMATCH'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients, half Gradio, half REST")
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of load in phase 1")
    parser.add_argument("--max-requests", type=int, default=2000, help="cap on phase 1's requests, all clients")
    parser.add_argument("--cycles", type=int, default=20, help="load/unload cycles in phase 2")
    parser.add_argument("--model", choices=["embedded", "tiny"], default="embedded",
                        help="embedded: assets/emoji-ldm; tiny: recipe/tiny.py's random model (quicker)")
    parser.add_argument("--serve", nargs=4, metavar=("PORT", "OUTPUTS", "MODELS", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        port, outputs, models, model = args.serve
        serve(int(port), outputs, models, model)
        return
    if args.clients < 2:
        parser.error("--clients must be at least 2 (one per API).")
    with tempfile.TemporaryDirectory(prefix="bench-load-") as folder:
        temp = Path(folder)
        tempfile.tempdir = folder         # gradio_client makes a folder per download under the temp dir
        server = start_server(temp, args.model)
        try:
            print(f"server: launch.py --api in process {server.process.pid} at {server.url}; RSS is that process's; "
                  f"clients run here")
            expected = load_phase(server, args, temp)
            cycles_phase(server, args, temp, expected)
        finally:
            server.stop()
            tempfile.tempdir = None


if __name__ == "__main__":
    main()
