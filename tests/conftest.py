"""Shared fixtures: the seeded tiny model (recipe/tiny.py) saved as a folder, and a studio on it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from recipe.tiny import build_tiny_pipeline

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def pytest_addoption(parser):
    parser.addoption("--fast", action="store_true",
                     help="the fast tier: every module's core behaviour in about a minute (tests marked `slow` are "
                          "left out; the full suite, which CI runs, has them)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: left out of the fast tier (`./studio.sh test --fast`)")
    # Test processes share the cores (pytest-xdist's `-n`): one torch team per process, sized to its share, since
    # two teams on the same cores slow each other several-fold
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


# The longest modules (about two minutes each of a test process's time, then under a minute), started first: the
# processes take whole modules in this order (`--dist loadscope`, studio.sh), so short modules fill the end
# instead of a long one starting last and running on alone
LONGEST_FIRST = ("test_page_inpaint_explorer", "test_server", "test_embedded", "test_page_controlnet",
                 "test_transformers", "test_lora_train", "test_page_messages", "test_api", "test_live",
                 "test_training_methods", "test_transformer_training", "test_bad_inputs", "test_explorer_flow",
                 "test_fast")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--fast"):
        slow = [item for item in items if item.get_closest_marker("slow")]
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}

    def order(item):
        # within a module of the transformer families' tests, one family's tests together: each switch of family
        # loads its model again (about 0.6 s)
        family = getattr(getattr(item, "callspec", None), "params", {}).get("family", "") \
            if "families" in getattr(item, "fixturenames", ()) else ""
        return rank.get(item.module.__name__.rsplit(".", 1)[-1], len(rank)), item.module.__name__, family

    items.sort(key=order)   # stable


MODULES_BETWEEN_FULL_COLLECTIONS = 8
_modules_started = [0]


@pytest.fixture(scope="module", autouse=True)
def garbage_collected_once_per_module():
    """What lives when a module starts (the libraries, the session's fixtures) is set aside from Python's garbage
    collector (`gc.freeze`): the studio collects garbage at every model it lets go, and a full collection over a
    test process that has imported torch, diffusers and Gradio and served a few studios costs about half a second;
    over what the module itself built, a small part of that. Each module starts by collecting what the last one
    left (built after the last freeze, so never frozen; its module fixtures are torn down by then) and freezing
    what survives. Most of that lives as long as the session, but not all (the device worker keeps its last jobs'
    results), so every MODULES_BETWEEN_FULL_COLLECTIONS modules everything is taken back and collected whole:
    unfreezing and collecting everything at every module cost about 0.7 s a module, 37 s of CPU a suite."""
    import gc

    if _modules_started[0] % MODULES_BETWEEN_FULL_COLLECTIONS == 0:
        gc.unfreeze()
    _modules_started[0] += 1
    gc.collect()
    gc.freeze()
    yield


@pytest.fixture(scope="session", autouse=True)
def one_certificate_store():
    """Every HTTP client made in this process shares one TLS context: gradio_client opens a new httpx client for
    each request and each file it downloads, and each read the system's certificate bundle again (tens of ms
    each, about 20 s over the suite). The tests speak plain HTTP to 127.0.0.1; the context is never used."""
    import functools

    import httpx._config
    import httpx._transports.default as transports

    original = httpx._config.create_ssl_context
    shared = functools.lru_cache(maxsize=None)(lambda trust_env: original(trust_env=trust_env))

    def create_ssl_context(verify=True, cert=None, trust_env=True):
        if verify is True and cert is None:
            return shared(trust_env)
        return original(verify=verify, cert=cert, trust_env=trust_env)

    transports.create_ssl_context = httpx._config.create_ssl_context = create_ssl_context
    yield
    transports.create_ssl_context = httpx._config.create_ssl_context = original


@pytest.fixture
def one_torch_thread():
    """For tests that run models on a thread of their own: on a small, busy CPU, intra-op threads that spin against
    each other make them many times slower; one thread keeps each test in seconds. (Modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")`.)"""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The tiny pipeline saved as a diffusers folder (safetensors), built once per test session."""
    folder = tmp_path_factory.mktemp("tiny") / "tiny-sd"
    build_tiny_pipeline(folder.parent).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture
def previews_in_lockstep(monkeypatch):
    """The device worker waits at each preview until the test has read it (call the returned function), so a Stop
    set on reading step k's preview is seen by step k's own callback, however far ahead a busy machine would let the
    worker run. Returns the function that tells the worker the preview was read; when the test ends (a failed one
    too) the worker waits no more."""
    import threading

    from pipelines.core.results import Preview
    from pipelines.jobs.worker import Job

    read, ended, original = threading.Semaphore(0), threading.Event(), Job.emit

    def emit(self, event, *, transient=False):
        original(self, event, transient=transient)
        if isinstance(event, Preview) and not ended.is_set():
            assert read.acquire(timeout=120), "the test never read this preview"

    monkeypatch.setattr(Job, "emit", emit)
    yield read.release
    ended.set()
    read.release()      # a worker waiting at a preview the test left unread (it failed) goes on


@pytest.fixture(scope="session")
def worker():
    """One device worker for the whole test session, as the studio has one (pipelines/jobs/worker.py)."""
    from pipelines.jobs.worker import DeviceWorker
    return DeviceWorker()


@pytest.fixture
def studio(tiny_model_dir, tmp_path, worker):
    """A model manager with the tiny model loaded from its folder, and a generator saving to tmp."""
    from pipelines.generation.generator import Generator
    from pipelines.models.manager import ModelManager
    from pipelines.models.memory import MemoryManager

    manager = ModelManager(MemoryManager(device="cpu"), worker=worker, models_dir=tmp_path / "models")
    manager.load(str(tiny_model_dir))
    return Generator(manager, tmp_path / "outputs")


@pytest.fixture
def pretend_cuda(studio, monkeypatch):
    """The studio's memory manager believes it drives a CUDA GPU with 24 GiB free; the pipelines record
    the placements the memory policy makes (device moves, offload, slicing) instead of doing them.
    Yields the list of (method name, id(pipeline)) calls, in order."""
    import torch

    from pipelines.models.memory import MemoryMode

    memory = studio.models.memory
    monkeypatch.setattr(memory, "device", torch.device("cuda"))
    monkeypatch.setattr(memory, "free_vram", lambda: 24 * 1024 ** 3)
    monkeypatch.setattr(memory, "mode", MemoryMode.HIGH)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "ipc_collect", lambda: None)
    calls: list[tuple[str, int]] = []
    pipelines = [studio.models.pipeline("txt2img"), studio.models.pipeline("img2img")]
    for pipeline in pipelines:
        for name in ("to", "enable_model_cpu_offload", "enable_sequential_cpu_offload", "enable_attention_slicing"):
            monkeypatch.setattr(pipeline, name,
                                lambda *a, _name=name, _id=id(pipeline), **k: calls.append((_name, _id)))
    return calls


@pytest.fixture(scope="module")
def sdxl_studio(tmp_path_factory, worker):
    """A studio on a seeded tiny SDXL-layout model (two text encoders, `text_time` added conditioning)."""
    from pipelines.generation.generator import Generator
    from pipelines.models.manager import ModelManager
    from pipelines.models.memory import MemoryManager
    from pipelines.models.sources import ModelSource
    from recipe.tiny import build_tiny_sdxl_pipeline

    folder = tmp_path_factory.mktemp("sdxl")
    models = ModelManager(MemoryManager(device="cpu"), worker=worker, models_dir=folder / "models")
    pipeline = build_tiny_sdxl_pipeline(folder)
    worker.call(lambda: models.adopt(pipeline, ModelSource("folder", str(folder), "tiny-sdxl")))
    return Generator(models, None)
