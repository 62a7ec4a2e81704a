"""Whether autocast is on at a node of a Dynamo graph, and to which dtype.

Autocast reaches a graph two ways. Entered around the compiled call (`with torch.autocast(...): model(x)`), it is
the state the graph is compiled in: torch.is_autocast_enabled() while the backend runs. Entered inside the compiled
code, it is part of the graph: Dynamo records `torch.amp.autocast_mode._enter_autocast(device, dtype, enabled,
cache)` and `_exit_autocast(<that node>)` around the ops it covers. accelerate's mixed precision (the Trainer's
`bf16=True`) is of the second kind: it wraps the model's forward in autocast before compiling it. A checkpointed
layer's body, a graph of its own, starts in the state of the node that calls it.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch.fx import Graph, Node

from .matcher import example_value

_State = tuple[bool, torch.dtype]  # (enabled, dtype)
_ENTER = getattr(torch.amp.autocast_mode, "_enter_autocast", None)
_EXIT = getattr(torch.amp.autocast_mode, "_exit_autocast", None)
_call_sites: "weakref.WeakKeyDictionary[Graph, Node]" = weakref.WeakKeyDictionary()
_states: "weakref.WeakKeyDictionary[Graph, dict]" = weakref.WeakKeyDictionary()


def called_from(body: Graph, call: Node) -> None:
    """Records that `body` (a nested graph) runs where `call`, a node of the enclosing graph, runs."""
    _call_sites[body] = call


def autocast_dtype(node: Node, device_type: str) -> Optional[torch.dtype]:
    """The dtype autocast runs `node`'s matmuls in on `device_type`, or None where autocast is off there."""
    enabled, dtype = _state_at(node, device_type)
    return dtype if enabled else None


def autocast_to(node: Node, t: torch.Tensor) -> bool:
    """A matmul with t at `node` runs in t's dtype whatever its weight's dtype: autocast is on there for t's device,
    to t's dtype (a float32 model under the Trainer's bf16=True)."""
    return autocast_dtype(node, t.device.type) == t.dtype


def matmul_cast(node: Node) -> Optional[torch.dtype]:
    """The dtype autocast casts `node`'s value to for a matmul where it is computed, where that is not its own
    dtype; else None."""
    value = example_value(node)
    if not isinstance(value, torch.Tensor):
        return None
    dtype = autocast_dtype(node, value.device.type)
    return dtype if dtype not in (None, value.dtype) else None


def _state_at(node: Node, device_type: str) -> _State:
    per_device = _states.setdefault(node.graph, {})
    states = per_device.get(device_type)
    if states is None or node not in states:  # first asked, or nodes were added since
        states = per_device[device_type] = _walk(node.graph, device_type)
    return states[node]


def _ambient(device_type: str) -> _State:
    try:
        return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
    except RuntimeError:  # a device type autocast does not know has no autocast
        return False, torch.float32


def _walk(graph: Graph, device_type: str) -> dict[Node, _State]:
    call = _call_sites.get(graph)
    state = _state_at(call, device_type) if call is not None else _ambient(device_type)
    before: dict[Node, _State] = {}  # each enter node of this device -> the state it replaced
    states = {}
    for n in graph.nodes:
        states[n] = state
        if n.op != "call_function":
            continue
        if n.target is _ENTER and n.args and n.args[0] == device_type:
            dtype, enabled = (list(n.args[1:3]) + [None, True])[:2]
            before[n] = state
            state = (bool(enabled), dtype if isinstance(dtype, torch.dtype) else state[1])
        elif n.target is _EXIT and n.args and n.args[0] in before:
            state = before[n.args[0]]
    return states
