"""Option `offload_activations`: saved activations go to CPU memory in forward and come back in backward.

Where: AOTAutograd's own activation offloading (torch._functorch config `enable_activation_offloading`) decides.
Its partitioner copies every saved value marked `should_offload` to the CPU after its last forward use and back
to the device before its first backward use. A joint-graph pass marks every computed tensor of at least
`MIN_BYTES`; the partitioner offloads those that end up saved for backward and that it can move (not a parameter,
a graph output, a view or a multi-output op's element). With gradient checkpointing what is saved is mostly each
decoder layer's input, which is what this is for.

How: the partitioner's copies are plain `prims.device_put` (to pageable host memory, which blocks the host; its
asynchronous version differs between torch releases and fails to compile in some). A post-grad pass turns its
copies into our ops. The copy out runs on a side stream into pinned memory while compute goes on. In backward the
first value needed comes back on the compute stream; each later one is fetched on the side stream as soon as the
one before it has come back (one layer ahead, with checkpointing), and the compute stream waits for that copy only
where the value is used.
"""
from __future__ import annotations

import collections
import contextlib

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

from .cache_key import keyed, user_pass

# Smaller tensors are not worth a transfer: a copy has a fixed cost of a few microseconds of launch and sync.
MIN_BYTES = 1 << 20


def _nbytes(value) -> int:
    if not isinstance(value, torch.Tensor):
        return 0
    return value.numel() * value.element_size()


class MarkLargeActivations(CustomGraphPass):
    """Joint-graph pass (Inductor's `joint_custom_pre_pass`): mark computed tensors of MIN_BYTES or more for the
    partitioner's offloading; runs the user's own pre-pass first when there is one."""

    def __init__(self, user_pass=None):
        self.user_pass = user_pass

    def __call__(self, graph: torch.fx.Graph) -> None:
        if self.user_pass is not None:
            self.user_pass(graph)
        for node in graph.nodes:
            if node.op == "call_function" and _nbytes(node.meta.get("val")) >= MIN_BYTES:
                node.meta["should_offload"] = True

    def uuid(self):
        return keyed(self.user_pass, "marks", MIN_BYTES)


_OFFLOADED, _RELOADED = "cpu_offload_", "gpu_reload_"  # the names AOTAutograd gives its copies
# pinned buffer's address -> the end of its copy out, until the copy back. A forward whose backward never runs leaves
# its entries: beyond MAX_PENDING the oldest is dropped after waiting for it (a copy back then needs no wait).
_copies_out: collections.OrderedDict[int, torch.cuda.Event] = collections.OrderedDict()
MAX_PENDING = 4096
_side_streams: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """The one stream per device that every copy out and every fetch ahead runs on (so they stay in order)."""
    if device not in _side_streams:
        _side_streams[device] = torch.cuda.Stream(device)
    return _side_streams[device]


def _off_cuda_copy(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Off CUDA the copy back is a plain one, a new tensor even on the same device (an op's output is no alias)."""
    return host.to(device).clone() if host.device == device else host.to(device)


@torch.library.custom_op("liger::offload_to_host", mutates_args=())
def offload_to_host(x: torch.Tensor) -> torch.Tensor:
    """x's copy in host memory: on CUDA, pinned and filled on a side stream (x's memory is not reused before that
    copy has read it); reload_from_host waits for the copy."""
    if x.device.type != "cuda":
        return x.clone()
    side = _side_stream(x.device)
    side.wait_stream(torch.cuda.current_stream(x.device))
    host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    with torch.cuda.stream(side):
        host.copy_(x, non_blocking=True)
        done = torch.cuda.Event()
        done.record(side)
    x.record_stream(side)
    _copies_out[host.data_ptr()] = done
    while len(_copies_out) > MAX_PENDING:
        _copies_out.popitem(last=False)[1].synchronize()
    return host


@offload_to_host.register_fake
def _(x):
    return torch.empty(x.shape, dtype=x.dtype, device="cpu")


@torch.library.custom_op("liger::reload_from_host", mutates_args=())
def reload_from_host(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The device copy of an offload_to_host result, on the compute stream, after that offload's copy ended."""
    if device.type != "cuda":
        return _off_cuda_copy(host, device)
    done = _copies_out.pop(host.data_ptr(), None)
    if done is not None:
        torch.cuda.current_stream(device).wait_event(done)
    return host.to(device, non_blocking=True)


@reload_from_host.register_fake
def _(host, device):
    return torch.empty(host.shape, dtype=host.dtype, device=device)


_prefetched: dict[int, tuple[torch.Tensor, torch.cuda.Event | None]] = {}  # pinned address -> (device copy, its end)


@torch.library.custom_op("liger::prefetch_to_device", mutates_args=())
def prefetch_to_device(host: torch.Tensor, device: torch.device, after: torch.Tensor) -> torch.Tensor:
    """Starts the device copy of an offload_to_host result on the side stream (after the copy out, which ran there
    too) and returns an empty token for take_prefetched. `after` only orders this call in the graph: it is a value
    the backward has just brought back, so that the copy starts one value ahead, not at the backward's start."""
    if device.type != "cuda":
        _prefetched[host.data_ptr()] = (_off_cuda_copy(host, device), None)
        return torch.empty(0, device=device)
    side = _side_stream(device)
    copy = torch.empty(host.shape, dtype=host.dtype, device=device)  # on the compute stream, where it is freed
    side.wait_stream(torch.cuda.current_stream(device))  # its memory's last users on the compute stream are done
    with torch.cuda.stream(side):
        copy.copy_(host, non_blocking=True)
        done = torch.cuda.Event()
        done.record(side)
    _prefetched[host.data_ptr()] = (copy, done)
    return torch.empty(0, device=device)


@prefetch_to_device.register_fake
def _(host, device, after):
    return torch.empty(0, device=device)


@torch.library.custom_op("liger::take_prefetched", mutates_args=())
def take_prefetched(host: torch.Tensor, device: torch.device, token: torch.Tensor) -> torch.Tensor:
    """The copy prefetch_to_device started, once the compute stream has waited for it (the plain copy back if
    there is none)."""
    entry = _prefetched.pop(host.data_ptr(), None)
    if entry is None:
        return reload_from_host(host, device)
    _copies_out.pop(host.data_ptr(), None)
    copy, done = entry
    if done is not None:
        torch.cuda.current_stream(device).wait_event(done)
    return copy


@take_prefetched.register_fake
def _(host, device, token):
    return torch.empty(host.shape, dtype=host.dtype, device=device)


class AsyncCopies(CustomGraphPass):
    """Post-grad pass (Inductor's `post_grad_custom_pre_pass`): AOTAutograd's offload copies become our ops; the
    user's own pre-pass runs first when there is one."""

    def __init__(self, user_pass=None):
        self.user_pass = user_pass

    def __call__(self, graph: torch.fx.Graph) -> None:
        if self.user_pass is not None:
            self.user_pass(graph)
        previous = None  # the value the last copy back brought: the next copy starts when it is there
        copies = [n for n in graph.nodes if n.op == "call_function" and n.target is torch.ops.prims.device_put.default]
        for node in copies:  # in graph order: the backward's copies back in the order their values are needed
            if node.name.startswith(_OFFLOADED):
                with graph.inserting_before(node):
                    new = graph.call_function(torch.ops.liger.offload_to_host.default, (node.args[0],))
            elif node.name.startswith(_RELOADED):
                host, device = node.args[:2]
                if previous is None:
                    with graph.inserting_before(node):
                        new = graph.call_function(torch.ops.liger.reload_from_host.default, (host, device))
                else:
                    with graph.inserting_after(previous):
                        token = graph.call_function(torch.ops.liger.prefetch_to_device.default,
                                                    (host, device, previous))
                    token.meta["val"] = node.meta["val"].new_empty(0)
                    with graph.inserting_before(node):
                        new = graph.call_function(torch.ops.liger.take_prefetched.default, (host, device, token))
                previous = new
            else:
                continue
            new.meta.update(node.meta)
            node.replace_all_uses_with(new)
            graph.erase_node(node)

    def uuid(self):
        return keyed(self.user_pass, "async copies", MIN_BYTES)


def supported() -> bool:
    import torch._functorch.config as config  # noqa: PLC0415

    return hasattr(config, "enable_activation_offloading")


def inductor_config(config: dict) -> dict:
    """Inductor's config patches with our two passes, each in front of (and calling) the user's own if any."""
    return {**config, "joint_custom_pre_pass": MarkLargeActivations(user_pass(config, "joint_custom_pre_pass")),
            "post_grad_custom_pre_pass": AsyncCopies(user_pass(config, "post_grad_custom_pre_pass"))}


def partitioner_config() -> contextlib.AbstractContextManager:
    """AOTAutograd's offloading on, in its synchronous form (AsyncCopies makes the copies asynchronous)."""
    import torch._functorch.config as config  # noqa: PLC0415

    patches = {"enable_activation_offloading": True}
    for key in ("activation_offload_separate_stream", "activation_reload_prefetch", "activation_offload_sink_wait"):
        if hasattr(config, key):
            patches[key] = False
    return config.patch(patches)
