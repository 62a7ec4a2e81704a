"""Structural matching of a pattern graph (a plain torch function, traced by torch.fx) against a Dynamo graph.

Dynamo writes the same math in several surface forms (`x.float()` or `x.to(torch.float32)`, `operator.mul` or
`torch.mul`, keyword or positional arguments, `a * b` or `b * a`). Both graphs are read through `canonical()`,
which maps those forms to one key, so a pattern is written once, the way the model's source writes it. Arguments
are read through the called function's own signature (its aten schema for a builtin), so a pattern may call any
torch function, with any mix of positional and keyword arguments, without the matcher knowing it.

Pattern placeholders are wildcards: they bind a graph node or a constant (so `eps` binds the literal 1e-06),
and a placeholder used twice must bind the same thing both times. Every other pattern node must match a graph
node with the same canonical op and matching arguments. Interior nodes of a match may not be used outside it,
unless the pattern also returns them (`return y, s`: `s` is then an output of the fused op, whatever else uses it).
"""
from __future__ import annotations

import contextlib
import inspect
import typing
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch.fx import Graph, Node
from torch.fx.operator_schemas import get_signature_for_torch_op

COMMUTATIVE = {"add", "mul"}
# Same op, other spelling. In-place variants (pow_, mul_...) are deliberately not aliased: they never match.
ALIASES = {"truediv": "div", "float": "to", "type_as": "to", "concat": "cat", "concatenate": "cat", "multiply": "mul"}


@dataclass(frozen=True)
class DtypeOf:
    """The dtype of another value: `y.type_as(x)` is read as `y.to(DtypeOf(x))`."""

    node: Any


def op_name(node: Node) -> str | None:
    if node.op == "call_method":
        name = node.target
    elif node.op == "call_function":
        name = getattr(node.target, "__name__", None) or str(node.target)
    else:
        return None
    name = name.strip("_") if name.startswith("__") else name
    return ALIASES.get(name, name)


# node -> (its args, kwargs and target when read, the canonical form): every match attempt reads the nodes it walks
# again, and binding a call to its signature is most of a rewrite's time. FX gives a node new args/kwargs objects
# whenever they change (an input replaced), so a form is reused only while they are the same objects.
_CANONICAL: "weakref.WeakKeyDictionary[Node, tuple]" = weakref.WeakKeyDictionary()


def canonical(node: Node) -> tuple[str | None, tuple, Mapping]:
    """(op, positional args, keyword args) with surface differences removed; read-only (shared between calls)."""
    known = _CANONICAL.get(node)
    if known is not None and known[0] is node.args and known[1] is node.kwargs and known[2] is node.target:
        return known[3]
    name, args, kwargs = _canonical(node)
    form = (name, tuple(args), MappingProxyType(kwargs))
    _CANONICAL[node] = (node.args, node.kwargs, node.target, form)
    return form


def _canonical(node: Node) -> tuple[str | None, list, dict]:
    name = op_name(node)
    args, kwargs = list(node.args), dict(node.kwargs)
    raw = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if raw == "float":
        kwargs = {"dtype": torch.float32}
    elif raw == "type_as":
        args, kwargs = args[:1], {"dtype": DtypeOf(args[1])}
    elif name == "to":
        # Not read by signature: Tensor.to's overloads (dtype; device, dtype; other tensor) take these at the same
        # positions and are told apart by the type of the value passed, which a pattern's wildcard does not have.
        rest = args[1:]
        args = args[:1]
        for a in rest:
            if isinstance(a, Node) and isinstance(example_value(a), torch.Tensor):
                kwargs.setdefault("dtype", DtypeOf(a))  # x.to(other_tensor)
            elif isinstance(a, (torch.dtype, Node)):  # a Node here is a pattern's dtype wildcard
                kwargs.setdefault("dtype", a)
            else:
                kwargs.setdefault("device", a)
        kwargs.pop("device", None)  # same-device moves are no-ops in a traced graph; dtype is what matters
        kwargs.pop("copy", None)
        kwargs.pop("non_blocking", None)
    else:
        bound = _bind(_signatures(node, name), args, kwargs)
        if bound is not None:
            # The tensor the op applies to (args[0]; for cat, the tensor list) stays positional: its parameter is
            # `input`, `self` or `tensor` depending on the spelling. For a commutative op so does its other operand,
            # so that both orders can be tried.
            values = list(bound.items())
            lead = 2 if name in COMMUTATIVE else 1
            args, kwargs = [v for _, v in values[:lead]], dict(values[lead:])
    return name, args, kwargs


# --- normalising a call from its function's signature ------------------------------------------------------------
# Every argument is read by its parameter's name, with the defaults filled in, so that keyword and positional
# arguments agree and leaving an argument out reads as passing its default. A Python function (F.silu,
# F.cross_entropy) is read by its own signature. Builtins (torch.*, most of F.*, Tensor methods, operator.*) have
# none: they are read by the schemas of the aten op behind them, one per overload, and every spelling of an op
# (`torch.var(x, ...)`, `x.var(...)`; `a / b`, `torch.div(a, b)`) reaches the same aten op, so the same overloads
# in the same order. (torch.fx's normalize_function reads calls the same way, but refuses a call that several
# overloads take unless it is given the arguments' types, which a pattern's wildcards do not have.)
_SIGNATURES: dict[tuple[str, Any], tuple[inspect.Signature, ...]] = {}


def _signatures(node: Node, name: str | None) -> tuple[inspect.Signature, ...]:
    key = (node.op, node.target)
    try:
        return _SIGNATURES[key]
    except KeyError:
        pass
    except TypeError:  # an unhashable target: looked up each time
        return _find_signatures(node.op, node.target, name)
    found = _SIGNATURES[key] = _find_signatures(node.op, node.target, name)
    return found


def _find_signatures(op: str, target: Any, name: str | None) -> tuple[inspect.Signature, ...]:
    if op == "call_function":
        # torch's own functions name their aten op (so do Python ones that stand for one, e.g. torch.split);
        # other Python functions have their own signature; operator.* and Tensor method descriptors go by their
        # name (`a / b` is aten div)
        packet, own = _aten_op_of(target), _python_function(target)
        if packet is None and own is None:
            packet = _aten_op_named(name)
    elif op == "call_method":
        packet, own = _aten_op_named(name), _python_function(getattr(torch.Tensor, str(target), None))
    else:
        return ()
    try:
        return _usable(get_signature_for_torch_op(packet) if packet is not None else
                       [inspect.signature(own)] if own is not None else [])
    except (TypeError, ValueError, RuntimeError):  # no signature to read it by: compared as written
        return ()


def _python_function(fn: Any) -> Any:
    fn = inspect.unwrap(fn) if callable(fn) else None
    return fn if inspect.isfunction(fn) else None


def _aten_op_of(target: Any) -> torch._ops.OpOverloadPacket | None:
    try:
        _, schemas = get_signature_for_torch_op(target, return_schemas=True)
    except Exception:  # not a torch op (a higher-order op, a Python builtin)
        return None
    if not schemas:
        return None
    namespace, _, op = schemas[0].name.partition("::")
    return _op_packet(getattr(torch.ops, namespace, None), op)


def _aten_op_named(name: str | None) -> torch._ops.OpOverloadPacket | None:
    return _op_packet(torch.ops.aten, name) if name and name.isidentifier() else None


def _op_packet(namespace: Any, name: str) -> torch._ops.OpOverloadPacket | None:
    try:
        packet = getattr(namespace, name)
    except Exception:  # no op of that name
        return None
    return packet if isinstance(packet, torch._ops.OpOverloadPacket) else None


def _tensor_like(annotation: Any) -> bool:
    if annotation is inspect.Parameter.empty or annotation is torch.Tensor:
        return True
    if isinstance(annotation, str):
        return "Tensor" in annotation
    return any(_tensor_like(a) for a in typing.get_args(annotation))


def _usable(signatures: list[inspect.Signature] | None) -> tuple[inspect.Signature, ...]:
    """The signatures a tensor op's call can be read by: named parameters only (no *args), a tensor (or tensor
    list) first. An aten op also lists overloads for other types (`pow.int(int a, int b)`, `split.str`)."""
    def usable(sig: inspect.Signature) -> bool:
        params = list(sig.parameters.values())
        return (bool(params) and _tensor_like(params[0].annotation)
                and all(p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params))

    return tuple(filter(usable, signatures or ()))


def _takes_list_second(sig: inspect.Signature) -> bool:
    params = list(sig.parameters.values())
    return len(params) > 1 and typing.get_origin(params[1].annotation) is list


def _bind(signatures: tuple[inspect.Signature, ...], args: list, kwargs: dict) -> dict | None:
    """The call's arguments by parameter name, defaults filled in, under the first signature that takes them (the
    same one for the pattern and the graph: the choice depends on the call's shape, not on value types, which a
    pattern's wildcards do not have). None when none does. Private parameters (F.softmax's `_stacklevel`) are
    left out: they do not change the value."""
    chosen = None
    for sig in signatures:
        with contextlib.suppress(TypeError):
            chosen = sig.bind(*args, **kwargs)
            break
    if chosen is None and len(args) > 2:
        # `x.view(a, b)` is `x.view((a, b))`: a list parameter also takes its items as separate arguments
        for sig in filter(_takes_list_second, signatures):
            with contextlib.suppress(TypeError):
                chosen = sig.bind(args[0], tuple(args[1:]), **kwargs)
                break
    if chosen is None:
        return None
    chosen.apply_defaults()
    return {k: v for i, (k, v) in enumerate(chosen.arguments.items()) if i == 0 or not k.startswith("_")}


class MatchFailure(Exception):
    def __init__(self, reason: str, progress: int):
        super().__init__(reason)
        self.reason, self.progress = reason, progress


@dataclass
class Match:
    """A pattern found in a graph: what each placeholder bound, and the graph nodes it covers."""

    root: Node
    bindings: dict[str, Any]
    nodes: list[Node]  # graph nodes covered by the pattern's call nodes, root included
    pattern: Any = None
    # interior nodes whose value is also returned by the graph (allowed only when the pattern can supply it)
    returned: list[Node] = field(default_factory=list)
    roots: list[Node] = field(default_factory=list)  # one per pattern output; roots[0] is `root`
    # for a match inside a nested graph: its inputs -> the enclosing graph's values passed to them
    outer: dict[Node, Node] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Any:
        return self.bindings[name]

    def value(self, name: str) -> Any:
        """The example value (a fake tensor, or a constant) behind a binding."""
        return example_value(self.bindings[name])

    def dtype(self, name: str) -> torch.dtype | None:
        b = self.bindings[name]
        if isinstance(b, DtypeOf):
            v = example_value(b.node)
            return getattr(v, "dtype", None)
        return b if isinstance(b, torch.dtype) else None


def example_value(x: Any) -> Any:
    if isinstance(x, Node):
        return x.meta.get("example_value", x.meta.get("val"))
    return x


@dataclass
class _State:
    bindings: dict[str, Any] = field(default_factory=dict)
    node_map: dict[Node, Node] = field(default_factory=dict)  # pattern node -> graph node

    def copy(self) -> "_State":
        return _State(dict(self.bindings), dict(self.node_map))


def _same_constant(a: Any, b: Any) -> bool:
    if isinstance(a, Node) or isinstance(b, Node):
        return a is b
    if type(a) in (bool,) or type(b) in (bool,):
        return type(a) is type(b) and a == b
    try:
        return bool(a == b)
    except Exception:
        return False


# Ops that only reshape or cast: two graph nodes applying one of them to the same arguments hold the same value
# (Dynamo sometimes emits `cos.unsqueeze(1)` twice where the model wrote it once, e.g. under dynamic shapes).
_VIEWS_AND_CASTS = {"unsqueeze", "squeeze", "view", "reshape", "expand", "transpose", "permute", "contiguous", "to",
                    "float", "type", "getitem"}


def _same_view(a: Node, b: Any) -> bool:
    if not isinstance(b, Node) or b.op not in ("call_function", "call_method"):
        return False
    (aname, aargs, akw), (bname, bargs, bkw) = canonical(a), canonical(b)
    return (aname == bname and aname in _VIEWS_AND_CASTS and len(aargs) == len(bargs) and set(akw) == set(bkw)
            and all(_same_constant(x, y) for x, y in zip(aargs, bargs))
            and all(_same_constant(akw[k], bkw[k]) for k in akw))


class _Matcher:
    def __init__(self):
        self.progress = 0
        self.visited: set[Node] = set()

    def fail(self, reason: str):
        raise MatchFailure(reason, self.progress)

    def match(self, p: Any, g: Any, st: _State) -> _State:
        if isinstance(p, Node):
            if p.op == "placeholder":
                if p.target in st.bindings:
                    if not _same_constant(st.bindings[p.target], g) and not (
                        isinstance(g, DtypeOf) and isinstance(st.bindings[p.target], DtypeOf)
                        and g.node is st.bindings[p.target].node
                    ):
                        self.fail(f"`{p.target}` must be the same value in both places it is used")
                    return st
                st.bindings[p.target] = g
                return st
            if p in st.node_map:
                if st.node_map[p] is not g and not _same_view(st.node_map[p], g):
                    self.fail(f"`{p.name}` feeds two places in the pattern but two different values in the graph")
                return st
            if not isinstance(g, Node) or g.op not in ("call_function", "call_method"):
                self.fail(f"expected `{op_name(p)}` here, found {_describe(g)}")
            pname, pargs, pkw = canonical(p)
            gname, gargs, gkw = canonical(g)
            if pname != gname:
                self.fail(f"expected `{pname}` where the graph has `{gname}` (node {g.name})")
            if len(pargs) != len(gargs) or set(pkw) != set(gkw):
                self.fail(f"`{gname}` at {g.name} is called with other arguments than the pattern's")
            self.visited.add(g)
            st.node_map[p] = g
            self.progress += 1
            orders = [gargs]
            if pname in COMMUTATIVE and len(gargs) == 2:
                orders.append([gargs[1], gargs[0]])
            # Each order starts from the progress made so far, so that the order which got further explains the
            # failure (counting on from the first order's failure, the second would always win, however early it
            # stopped); a tie goes to the order the graph wrote.
            start = self.progress
            last: MatchFailure | None = None
            for order in orders:
                self.progress = start
                trial = st.copy()
                try:
                    for pa, ga in zip(pargs, order):
                        trial = self.match(pa, ga, trial)
                    for k in pkw:
                        trial = self.match(pkw[k], gkw[k], trial)
                    return trial
                except MatchFailure as e:
                    last = e if last is None or e.progress > last.progress else last
            self.progress = last.progress
            raise last
        if isinstance(p, (list, tuple)):
            if not isinstance(g, (list, tuple)) or len(p) != len(g):
                self.fail(f"expected a sequence of {len(p)} items, found {_describe(g)}")
            for pa, ga in zip(p, g):
                st = self.match(pa, ga, st)
            return st
        if isinstance(p, slice):
            if not isinstance(g, slice):
                self.fail(f"expected a slice, found {_describe(g)}")
            for attr in ("start", "stop", "step"):
                st = self.match(getattr(p, attr), getattr(g, attr), st)
            return st
        if isinstance(p, DtypeOf):
            if not isinstance(g, DtypeOf):
                # `.type_as(x)` in the pattern also matches a literal dtype equal to x's dtype
                self.fail(f"expected the dtype of another value, found {_describe(g)}")
            return self.match(p.node, g.node, st)
        if not _same_constant(p, g):
            self.fail(f"expected the constant {p!r}, found {_describe(g)}")
        return st


def _describe(g: Any) -> str:
    if isinstance(g, Node):
        return f"`{op_name(g) or g.op}` (node {g.name})"
    return f"the constant {g!r}"


def pattern_roots(pattern_graph: Graph) -> list[Node]:
    """The pattern's outputs: one tensor, or a tuple of them (e.g. rotary's q and k)."""
    out = next(n for n in pattern_graph.nodes if n.op == "output")
    roots = list(out.args[0]) if isinstance(out.args[0], (tuple, list)) else [out.args[0]]
    if not all(isinstance(r, Node) for r in roots):
        raise TypeError("a search function must return a tensor or a tuple of tensors")
    return roots


def pattern_root(pattern_graph: Graph) -> Node:
    return pattern_roots(pattern_graph)[0]


# Casts a wrapper may put between a value and the graph's output (accelerate's mixed precision returns every
# output as fp32: `logits.float()` inside the compiled graph).
_OUTPUT_CASTS = {"float", "to", "type"}


def is_output_cast(u: Node) -> bool:
    """A dtype cast of one value, whose only uses are the graph's output (or further such casts)."""
    return (u.op == "call_method" and u.target in _OUTPUT_CASTS and len(u.all_input_nodes) == 1 and
            bool(u.users) and all(returned_as_is_or_cast(x) for x in u.users))


def returned_as_is_or_cast(u: Node) -> bool:
    return u.op == "output" or is_output_cast(u)


def try_match(pattern_graph: Graph, root: Node, allow_returned: bool = False
              ) -> tuple[Match | None, MatchFailure | None, set[Node]]:
    """Matches the pattern with its output at `root`. Returns (match, failure, graph nodes looked at).

    With allow_returned, an interior value whose only outside use is the graph's output (as it is, or through a
    dtype cast that is only returned) is allowed and listed in `Match.returned`; the pattern must then say how
    that value is provided.
    """
    m = _Matcher()
    proots = pattern_roots(pattern_graph)
    try:
        st = m.match(proots[0], root, _State())
        roots = [root]
        for p in proots[1:]:  # later outputs: any node that matches with the bindings made so far
            if p in st.node_map:  # an interior value the pattern also returns (a norm's input that is kept too)
                roots.append(st.node_map[p])
                continue
            st, found = _match_elsewhere(m, p, root.graph, st, exclude=set(st.node_map.values()))
            roots.append(found)
    except MatchFailure as e:
        return None, e, m.visited
    covered = list(dict.fromkeys(st.node_map.values()))
    inside = set(covered)
    for r in roots[1:]:
        early = _used_before(r, root, inside)
        if early is not None:
            return None, MatchFailure(
                f"`{r.name}` is used by `{early.name}` before the pattern's end, where the fused op would go",
                m.progress + 1,
            ), m.visited
    returned = []
    for n in covered:
        if n in roots:
            continue
        outside = [u for u in n.users if u not in inside]
        if allow_returned and outside and all(returned_as_is_or_cast(u) for u in outside):
            returned.append(n)
        elif outside:
            return None, MatchFailure(
                f"intermediate `{n.name}` is also used by `{outside[0].name}` outside the pattern", m.progress + 1
            ), m.visited
    return Match(root=root, bindings=st.bindings, nodes=covered, returned=returned, roots=roots), None, m.visited


def _used_before(r: Node, root: Node, inside: set[Node]) -> Node | None:
    """An outside user of the output `r` placed between r and `root`: the fused op, inserted just before root,
    would come after it. None when there is none (or when r comes after root: its users do too)."""
    early, n = None, r.next
    while n.op != "root":  # the graph's sentinel closes its node list
        if n is root:
            return early
        if early is None and n in r.users and n not in inside:
            early = n
        n = n.next
    return None


def _match_elsewhere(m: _Matcher, p: Node, graph: Graph, st: _State, exclude: set[Node]) -> tuple[_State, Node]:
    name = op_name(p)
    best: MatchFailure | None = None
    for g in graph.nodes:
        if g in exclude or op_name(g) != name:
            continue
        try:
            return m.match(p, g, st.copy()), g
        except MatchFailure as e:
            best = e if best is None or e.progress > best.progress else best
    raise best or MatchFailure(f"no `{name}` node completes the pattern's second output", m.progress)


