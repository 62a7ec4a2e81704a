"""Option `offload_activations`: saved activations go to CPU memory in forward and come back in backward.

Built on AOTAutograd's own activation offloading (torch._functorch config `enable_activation_offloading`): the
partitioner moves every saved value marked `should_offload` to the CPU after its last forward use and back to the
GPU before its first backward use. We only mark: a joint-graph pass tags every computed tensor of at least
`MIN_BYTES`; the partitioner then offloads those that end up saved for backward and that it can move (not a
parameter, a graph output, a view or a multi-output op's element). With gradient checkpointing what is saved is
mostly each decoder layer's input, which is what this is for: a layer's input is read back one layer of backward
before it is needed, on a side stream, while compute runs.
"""
from __future__ import annotations

import contextlib
import functools

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

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
        user = None
        if self.user_pass is not None:
            user = self.user_pass.uuid() if isinstance(self.user_pass, CustomGraphPass) else None
            if user is None:  # the user's pass cannot be keyed: no caching, as Inductor does for it alone
                return None
        return (_source_hash(), MIN_BYTES, user)


@functools.cache
def _source_hash() -> str:
    return get_hash_for_files((__file__,))


def supported() -> bool:
    import torch._functorch.config as config  # noqa: PLC0415

    return hasattr(config, "enable_activation_offloading")


def inductor_config(config: dict) -> dict:
    """Inductor's config patches with our marking pass in front of (and calling) any the user gave."""
    return {**config, "joint_custom_pre_pass": MarkLargeActivations(config.get("joint_custom_pre_pass"))}


def partitioner_config(on_cuda: bool) -> contextlib.AbstractContextManager:
    """The AOTAutograd settings for one compile: offloading on, and on CUDA the asynchronous version (a transfer
    stream, pinned host buffers, reloads issued early) where this torch has it. The wait for each offload stays
    right after it, so a tensor's GPU memory is freed during forward, not at its end (a whole-model graph would
    otherwise keep every offloaded tensor until the last layer)."""
    import torch._functorch.config as config  # noqa: PLC0415

    patches = {"enable_activation_offloading": True}
    if on_cuda:
        for key in ("activation_offload_separate_stream", "activation_reload_prefetch"):
            if hasattr(config, key):
                patches[key] = True
    return config.patch(patches)
