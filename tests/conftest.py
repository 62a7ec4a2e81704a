import os

import torch

# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors. It must be chosen before
# triton (and so our kernels) is first imported, which `import torch` alone does not do.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402

import pytest  # noqa: E402


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def usable_cpus() -> int:
    """CPUs this process may use: its affinity, capped by a cgroup CPU quota (a container limited to 2 CPUs on a
    larger host still sees every host CPU in its affinity, and torch would start a thread per host CPU)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    v2, v1 = _read("/sys/fs/cgroup/cpu.max"), _read("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
    quota, period = (v2.split() + [""])[:2] if v2 else (v1, _read("/sys/fs/cgroup/cpu/cpu.cfs_period_us"))
    if quota and period and quota.isdigit() and period.isdigit() and int(period) > 0:  # "max" / "-1": no quota
        cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    return cpus


def cpu_share(workers: int) -> int:
    return max(1, usable_cpus() // workers)


def pytest_configure(config):
    """Each pytest-xdist worker (and what it starts: compile workers, subprocess tests) takes its share of the CPUs,
    so that the workers' OpenMP threads and Inductor's C++ compiles do not outnumber the cores. The controller of an
    xdist run runs no tests and leaves the environment to its workers; a variable the user set is kept."""
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        return
    threads = cpu_share(int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    for name in ("OMP_NUM_THREADS", "TORCHINDUCTOR_COMPILE_THREADS"):
        if not os.environ.get(name, "").isdigit():
            os.environ[name] = str(threads)
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    import torch._inductor.config as inductor_config  # noqa: PLC0415  (it read the variable when first imported)

    inductor_config.compile_threads = int(os.environ["TORCHINDUCTOR_COMPILE_THREADS"])


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, config):
    """The CPU share in the run's last lines (they are what a CI log keeps), as the workers computed it."""
    workers = getattr(config.option, "numprocesses", None) or 1
    threads = os.environ.get("OMP_NUM_THREADS") if workers == 1 else cpu_share(workers)
    terminalreporter.write_line(f"cpus: {os.cpu_count()} seen, {usable_cpus()} usable; {workers} worker(s) of "
                                f"{threads} torch and Inductor compile thread(s) each")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: no cache entries or recompile counts carried across tests."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def second_versions(monkeypatch):
    """Records the graphs compiled a second time, without their run-time assumptions (their indices)."""
    import liger_compile.backend as backend_module

    built = []
    original = backend_module._without_assumptions

    def counting(*args, **kwargs):
        built.append(args[-1].index)
        return original(*args, **kwargs)

    monkeypatch.setattr(backend_module, "_without_assumptions", counting)
    return built


@pytest.fixture
def liger_warnings():
    """The liger_compile logger's warnings, collected by a handler of its own: unlike caplog it also works when
    pytest runs with its logging plugin off (`-p no:logging`, as the GPU runs do)."""
    import logging  # noqa: PLC0415

    messages = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    log = logging.getLogger("liger_compile")
    log.addHandler(handler)
    yield messages
    log.removeHandler(handler)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (the GPU tests run on a CUDA machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
