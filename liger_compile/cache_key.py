"""Our sources in the keys of Inductor's FX graph cache and AOTAutograd's cache.

Both caches key a graph by what Dynamo hands them. A graph we rewrote calls our ops by name (`liger::...`), and
torch.compile traces into the ops declared as `triton_op`: their Python code (the matmuls around a kernel, the
grid, the tile chosen) ends up in the compiled code, but only the Triton kernels' own source is in the key. After
an upgrade of this package a cache filled by the previous version would hand back that version's compiled ops.
A do-nothing post-grad pass whose `uuid()` is the hash of our source files puts them in the key: Inductor hashes
every custom pass's uuid into its config's part of the key, and AOTAutograd's key contains Inductor's.
"""
from __future__ import annotations

import functools
import os

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

# the installed packages whose code compiled graphs contain (pyproject.toml's list): each folder, not recursive
_PACKAGES = ("liger_compile", "liger_compile.patterns", "liger_compile.kernels",
             "liger_compile.kernels.linear_cross_entropy")


@functools.cache
def package_hash() -> bytes:
    import importlib  # noqa: PLC0415

    files = []
    for name in _PACKAGES:
        folder = os.path.dirname(importlib.import_module(name).__file__)
        files += sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".py"))
    return get_hash_for_files(tuple(files))


def user_pass(config: dict, key: str):
    """The pass the user set for `key`: in our inductor_config option, else in torch._inductor.config."""
    return config.get(key) or getattr(torch._inductor.config, key, None)


def keyed(user, *ours) -> tuple | None:
    """A uuid for a pass of ours that runs `user`'s pass too: None (no caching, as Inductor does for the user's pass
    alone) when the user's pass cannot be keyed."""
    user_uuid = None
    if user is not None:
        user_uuid = user.uuid() if isinstance(user, CustomGraphPass) else None
        if user_uuid is None:
            return None
    return (package_hash(), *ours, user_uuid)


class SourceStamp(CustomGraphPass):
    """Inductor's `post_grad_custom_post_pass`: runs the user's pass if there is one, and keys the compile by our
    sources."""

    def __init__(self, user=None):
        self.user = user

    def __call__(self, graph: torch.fx.Graph) -> None:
        if self.user is not None:
            self.user(graph)

    def uuid(self):
        return keyed(self.user, "sources")


def stamped(config: dict) -> dict:
    """Inductor's config patches with the source stamp in front of the user's post-grad post pass."""
    key = "post_grad_custom_post_pass"
    return {**config, key: SourceStamp(user_pass(config, key))}
