import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from extract.demo import generate_demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The tests run on the CPU, also on a GPU box (the README's numbers are CPU numbers; their subprocesses inherit
# this); FRAMEGATE_TEST_CUDA=1 lets them see the GPU and run the CUDA tests. Set before torch first looks for one.
if os.environ.get("FRAMEGATE_TEST_CUDA") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""


SUBPROCESS = {"run_cli", "killed_after_first_epoch", "torchrun", "subprocess", "Popen"}


def _starts_processes(fn, depth: int = 2) -> bool:
    """Whether test function ``fn`` (or a helper of its module it calls, ``depth`` levels down)
    starts a process: a CLI as a user runs it, or torchrun."""
    names = set(fn.__code__.co_names) | {c.co_name for c in fn.__code__.co_consts if hasattr(c, "co_names")}
    if names & SUBPROCESS:
        return True
    helpers = [fn.__globals__.get(n) for n in names]
    return depth > 0 and any(callable(h) and getattr(h, "__module__", "") == fn.__module__ and hasattr(h, "__code__")
                             and _starts_processes(h, depth - 1) for h in helpers)


def pytest_collection_modifyitems(items):
    """Mark ``slow`` every test that starts processes (``pytest -m "not slow"``: the in-process tests,
    about a third of the time); CI runs them all."""
    for item in items:
        fn = getattr(item, "function", None)
        if fn is not None and _starts_processes(fn):
            item.add_marker(pytest.mark.slow)


@contextlib.contextmanager
def made_once(tmp_path_factory, name: str):
    """A folder for what the whole test run shares, read-only to the tests: under pytest-xdist the
    workers of one run take turns on a lock and the first makes it (yielding the folder to fill, or
    ``None`` when it is made); alone, a folder of this session's."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    base = tmp_path_factory.getbasetemp()
    folder = (base.parent if worker else base) / f"shared-{name}"
    with open(folder.parent / f"shared-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = folder / ".made"
        if done.exists():
            yield folder, False
            return
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        yield folder, True
        done.touch()


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """A tiny demo: 10 classes x 2 videos of 24 frames (real H.264 files), made once per test run."""
    with made_once(tmp_path_factory, "demo") as (root, make):
        if make:
            generate_demo(str(root), videos_per_class=2, frames=24, test_fraction=0.5, progress=False)
    return str(root)


@pytest.fixture
def demo_copy(demo_root, tmp_path):
    """A private copy of the tiny demo that a test may damage."""
    root = str(tmp_path / "demo")
    shutil.copytree(demo_root, root)
    return root


def run_cli(*args, check=True, env=None, **kwargs):
    """Run a console entry point as a user would (a subprocess) and return the CompletedProcess."""
    full_env = {**os.environ, "PYTHONPATH": ROOT, **(env or {})}
    proc = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=full_env,
                          cwd=kwargs.pop("cwd", ROOT), **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def killed_after_first_epoch(module_args, run, env=None):
    """Start ``python -m <module_args> --out run`` in a session of its own and SIGKILL the whole
    session (every rank under torchrun) once epoch 0 is logged; the resume point must be there."""
    proc = subprocess.Popen([sys.executable, "-m", *module_args, "--out", str(run)], cwd=ROOT, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": ROOT, **(env or {})}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "train_log.csv").exists():
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (run / "last.pt").exists() and not (run / "metrics.json").exists()


@pytest.fixture(scope="session")
def demo_cache(demo_root, tmp_path_factory):
    """The tiny demo through extract-features: LiteEval-style coarse/fine pair, 8 frames per video
    (made once per test run; read-only to the tests)."""
    with made_once(tmp_path_factory, "cache") as (folder, make):
        if make:
            run_cli("extract.cli", "--dataset", "demo", "--video-root", demo_root, "--num-frames", "8", "--out",
                    str(folder / "demo_t8.h5"), "--backbone", "efficientnet_lite0@112", "--backbone",
                    "efficientnet_lite0@224", "--workers", "1", "--no-progress")
    return str(folder / "demo_t8.h5")


TOY_FLOPS, TOY_DIMS = {"resnet50@224": 4.0, "mobilenetv2@84": 0.3}, {"resnet50@224": 6, "mobilenetv2@84": 5}


def toy_method(name: str, sampling: dict):
    """Method ``name`` built on two made-up features (``TOY_DIMS``: 6-d expensive, 5-d cheap), 3 classes,
    hidden 8 where it has that option; seeded."""
    from policy.methods import METHODS

    torch.manual_seed(0)
    cls = METHODS[name]
    small = {"hidden": 8} if "hidden" in cls.Config.__dataclass_fields__ else {}
    return cls(cls.resolve(cls.Config(method=name, **small), TOY_FLOPS, sampling), TOY_DIMS, 3, TOY_FLOPS)


@pytest.fixture
def two_classes(demo_root, tmp_path):
    """A folder per class (the `list` format): 2 classes x 2 training videos, 1 validation video each."""
    root = tmp_path / "videos"
    for name in ("red_disc", "blue_disc"):
        for split, numbers in (("train", ("000", "001")), ("val", ("001",))):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for number in numbers:
                shutil.copy(os.path.join(demo_root, "videos", f"{name}_{number}.mp4"), root / split / name)
    return root


def hang_decoding(monkeypatch, module, name: str, suffix: str, limit: float = 3.0) -> None:
    """Make ``module.name`` (a decoding function taking the video's path first) hang on the video whose
    path ends with ``suffix``, deaf to SIGTERM and SIGINT as a decoder looping in native code is, and
    the decoding time limit ``limit`` s, looked at every 0.5 s. Worker processes forked afterwards
    inherit both."""
    from extract import workers

    real = getattr(module, name)

    def hanging(path, *args):
        if str(path).endswith(suffix):
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
            while True:
                time.sleep(1)
        return real(path, *args)

    monkeypatch.setattr(module, name, hanging)
    monkeypatch.setattr(workers, "TICK", 0.5)
    monkeypatch.setattr(workers, "decode_limit", lambda path: limit)
