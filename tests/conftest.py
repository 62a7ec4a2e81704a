import os

import torch

# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors. It must be chosen before
# triton (and so our kernels) is first imported, which `import torch` alone does not do.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


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


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (the GPU tests run on a CUDA machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
