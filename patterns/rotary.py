"""Rotary position embedding as HF's models write it, fused into ``liger::rotary`` (q and k in one launch) or
``liger::rotary_one`` (one tensor).

Each variant is a `Form`: how the pairs are rotated, how cos/sin are shaped for it, the casts around it, whether
only a slice of the head is rotated (the rest concatenated back), and whether q and k are rotated together. The
search functions are generated from the form, so a variant is one line of FORMS:
    rotation   "rotate_half"      x * c + cat(-x[..., h:], x[..., :h]) * s             (Llama; pairs "halves")
               "rotate_half_neg"  x * c + cat(x[..., h:], -x[..., :h]) * s             (the rotation by -angle)
               "every_two"        x * c + stack((-x[..., 1::2], x[..., ::2]), -1).flatten(-2) * s
                                                                                       (GPT-J, GLM, Cohere; "interleaved")
               "interleave_cat"   cat([x1 * c - x2 * s, x2 * c + x1 * s]), x1, x2 = x[..., 0::2], x[..., 1::2]
                                                                                       (DeepSeek; "interleaved_to_halves")
               "chunk_cat"        the same with x1, x2 = chunk(x, 2, -1)               (gpt-oss; "halves")
               "complex"          view_as_real(view_as_complex(x.float().reshape(..., -1, 2)) * f).flatten(3)
                                  with f a complex table                              (Llama 4, DeepSeek-V2; "interleaved")
    tables     "unsqueeze"        cos.unsqueeze(u)
               "half_repeat"      cos.unsqueeze(u)[..., :hc].repeat_interleave(2, -1)  (one angle per pair)
               "half_unsqueeze"   cos[..., :hc].unsqueeze(u)
               "repeat_unsqueeze" cos.repeat_interleave(2, -1).unsqueeze(u)            (the table has one per pair)
               "index_repeat"     repeat_interleave(cos[:, :, None, :], 2, 3)          (GPT-J: heads on axis 2)
               "index"            f[:, :, None, :]                                      (Llama 4)
               "unsqueeze_to"     f.unsqueeze(u).to(device)                             (DeepSeek-V2)
    casts      "float_in"         x.float() rotated, the result cast back (`.to(dtype)`, `.type_as(x)`)
               "float_rot"        x.float() * c + rotate(x).float() * s, cast back
    partial    "first"            cat([rotated(x[..., :r]), x[..., r:]], -1)
               "last"             cat([x[..., :r], rotated(x[..., r:])], -1), r < 0    (DeepSeek-V4's [nope | rope])
Every two-tensor form also has a one-tensor variant, tried after all two-tensor ones: it fuses q and k separately
where one op for both has no place (Gemma 3n / Gemma 4 use the rotated q before computing k), and models that
rotate one tensor per call (GPT-J, DeepSeek-V4).
"""
from __future__ import annotations

import dataclasses

import torch

from liger_compile.kernels import rotary as _op  # noqa: F401  (defines the ops)
from liger_compile.kernels._common import FLOAT_DTYPES
from liger_compile.matcher import Match, example_value, op_name
from liger_compile.pattern import Pattern

PRIORITY = 5  # before rms_norm: its residual-add variant would take the rotary's final add (q norms after rotary)


@dataclasses.dataclass(frozen=True)
class Form:
    """One way of writing rotary (see the module docstring for the values of each field)."""

    name: str  # the variant, as the report shows it
    rotation: str
    tables: str
    casts: str = ""
    partial: str = ""
    index4: bool = False  # slices spelled x[:, :, :, s] (GPT-J) instead of x[..., s]
    tensors: int = 2

    @property
    def pairs(self) -> str:
        return {"every_two": "interleaved", "complex": "interleaved",
                "interleave_cat": "interleaved_to_halves"}.get(self.rotation, "halves")

    @property
    def angle_per_pair(self) -> bool:
        """Whether the op's tables hold one angle per pair (width R/2), or one per channel (width R)."""
        return self.tables != "unsqueeze" or self.rotation in ("interleave_cat", "chunk_cat")


# Two-tensor forms; a partial form before its whole-head one (it takes the concatenation too).
FORMS = [
    Form("rotate_half_partial", "rotate_half", "unsqueeze", partial="first"),  # Phi, GPT-NeoX, dots.llm3
    Form("every_two_partial", "every_two", "half_repeat", partial="first"),  # GLM, GLM-4
    Form("rotate_half", "rotate_half", "unsqueeze"),  # Llama
    Form("rotate_half_fp32", "rotate_half", "unsqueeze", casts="float_in"),  # ModernBERT decoder
    Form("rotate_half_negated", "rotate_half_neg", "unsqueeze"),  # nanochat
    Form("every_two", "every_two", "half_repeat"),  # Helium
    Form("every_two_fp32", "every_two", "half_repeat", casts="float_rot"),  # ERNIE 4.5
    Form("every_two_tables_fp32", "every_two", "unsqueeze", casts="float_in"),  # Cohere
    Form("interleaved_to_halves", "interleave_cat", "half_unsqueeze"),  # DeepSeek-V3 MLA and its kin
    Form("chunk", "chunk_cat", "unsqueeze"),  # gpt-oss
    Form("complex", "complex", "index", casts="float_in"),  # Llama 4
    Form("complex_unsqueezed", "complex", "unsqueeze_to", casts="float_in"),  # DeepSeek-V2
]
ONE_TENSOR_FORMS = [
    Form("every_two_last_fp32", "every_two", "repeat_unsqueeze", casts="float_rot", partial="last", tensors=1),
    Form("every_two_index_partial", "every_two", "index_repeat", partial="first", index4=True, tensors=1),
    Form("every_two_index", "every_two", "index_repeat", index4=True, tensors=1),
] + [dataclasses.replace(f, name=f"{f.name}_one", tensors=1) for f in FORMS]


# --- the search functions, generated from a form ---------------------------------------------------------------
def _last_axis(form: Form, x, s):
    return x[:, :, :, s] if form.index4 else x[..., s]


def _table(form: Form, t, udim, hc):
    if form.tables == "unsqueeze":
        return t.unsqueeze(udim)
    if form.tables == "half_repeat":
        return t.unsqueeze(udim)[..., :hc].repeat_interleave(2, dim=-1)
    if form.tables == "half_unsqueeze":
        return t[..., :hc].unsqueeze(udim)
    if form.tables == "repeat_unsqueeze":
        return t.repeat_interleave(2, dim=-1).unsqueeze(udim)
    if form.tables == "index":
        return t[:, :, None, :]
    if form.tables == "unsqueeze_to":
        # the device is not compared (a move within one device changes no value): "cpu" stands for any
        return t.unsqueeze(udim).to("cpu")
    return torch.repeat_interleave(t[:, :, None, :], 2, 3)  # index_repeat


def _rotated(form: Form, x, c, s, h, z, lead=()):
    if form.rotation == "complex":  # c is the complex table, s unused
        pairs = torch.view_as_complex(x.float().reshape(*lead, -1, 2))
        return torch.view_as_real(pairs * c).flatten(3)
    if form.rotation in ("interleave_cat", "chunk_cat"):
        if form.rotation == "chunk_cat":
            halves = torch.chunk(x, 2, dim=-1)
            x1, x2 = halves[0], halves[1]
        else:
            x1, x2 = _last_axis(form, x, slice(z, None, 2)), _last_axis(form, x, slice(1, None, 2))
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
    xr = x.float() if form.casts == "float_in" else x
    if form.rotation == "every_two":
        x1, x2 = _last_axis(form, xr, slice(z, None, 2)), _last_axis(form, xr, slice(1, None, 2))
        turned = torch.stack((-x2, x1), dim=-1).flatten(-2)
    else:
        x1, x2 = _last_axis(form, xr, slice(None, h)), _last_axis(form, xr, slice(h, None))
        turned = torch.cat((-x2, x1) if form.rotation == "rotate_half" else (x2, -x1), dim=-1)
    if form.casts == "float_rot":
        return x.float() * c + turned.float() * s
    return xr * c + turned * s


def _embedded(form: Form, x, c, s, h, z, r, dt, lead=()):
    if form.partial == "first":
        kept, x = _last_axis(form, x, slice(r, None)), _last_axis(form, x, slice(None, r))
    elif form.partial == "last":
        kept, x = _last_axis(form, x, slice(None, r)), _last_axis(form, x, slice(r, None))
    y = _rotated(form, x, c, s, h, z, lead)
    if form.casts:
        y = y.to(dt)
    if form.partial == "first":
        return torch.cat([y, kept], dim=-1)
    if form.partial == "last":
        return torch.cat([kept, y], dim=-1)
    return y


def _search(form: Form):
    # One signature for every form; the wildcards a form does not use stay unbound (the matcher binds only what
    # the pattern's outputs reach).
    def search(q, k, cos, sin, udim, h, z, hc, r, dt, dtk, q0, q1, q2, k0, k1, k2):
        c, s = _table(form, cos, udim, hc), _table(form, sin, udim, hc)
        # the complex form has one table, bound as cos; q's and k's leading sizes are those of their reshapes, and
        # each may be cast back to its own dtype (`.type_as(q)`, `.type_as(k)`)
        one = _embedded(form, q, c, s, h, z, r, dt, (q0, q1, q2))
        if form.tensors == 1:
            return one
        return one, _embedded(form, k, c, s, h, z, r, dtk, (k0, k1, k2))

    return search


# --- the replacement -------------------------------------------------------------------------------------------
def _head_dim(x) -> int:
    return example_value(x.node if hasattr(x, "node") else x).shape[-1]


def _slice(form: Form, r, d: int) -> tuple[int, int]:
    """(rotary_start, rotary_dim) of the op for a head of d channels, the slice cut at r."""
    if form.partial == "first":
        return 0, r
    if form.partial == "last":
        return d + r, -r
    return 0, d


def _replace(form: Form):
    def replace(q=None, k=None, cos=None, sin=None, udim=None, h=None, z=None, hc=None, r=None, dt=None, dtk=None,
                **lead):
        c, s = cos, sin
        if form.rotation == "complex":
            parts = torch.view_as_real(cos)  # [..., R/2, 2]: cos and sin of each pair's angle
            c, s = parts[..., 0], parts[..., 1]
        if form.tables in ("half_repeat", "half_unsqueeze"):
            c, s = cos[..., :hc], sin[..., :hc]
        if form.rotation == "rotate_half_neg":
            s = -s  # rotate_half with the signs swapped is the rotation by the negated angle
        unsqueeze_dim = 2 if form.tables in ("index_repeat", "index") else int(udim)
        start, width = _slice(form, r, _head_dim(q))
        if form.tensors == 1:
            outs = (torch.ops.liger.rotary_one(q, c, s, unsqueeze_dim, form.pairs, start, width),)
        else:
            out = torch.ops.liger.rotary(q, k, c, s, unsqueeze_dim, form.pairs, start, width)
            outs = (out[0], out[1])
        if form.casts:
            # the model casts its fp32 result (to bf16 for an fp32 table): so do we, after the op's one rounding
            outs = tuple(o if want == _op_dtype(x, cos) else o.to(want) for o, x, want in zip(outs, (q, k), (dt, dtk)))
        return outs[0] if form.tensors == 1 else outs

    return replace


def _table_dtype(cos: torch.Tensor) -> torch.dtype:
    return {torch.complex64: torch.float32}.get(cos.dtype, cos.dtype)


def _op_dtype(q, cos) -> torch.dtype:
    """What the op returns for these inputs (example values or graph proxies)."""
    q, cos = (example_value(x.node if hasattr(x, "node") else x) for x in (q, cos))
    return torch.promote_types(q.dtype, _table_dtype(cos))


# --- the check -------------------------------------------------------------------------------------------------
def _check(form: Form):
    def check(m: Match) -> str | None:
        names = [n for n in ("q", "k", "cos", "sin") if n in m.bindings]
        values = {n: m.value(n) for n in names}
        if not all(isinstance(t, torch.Tensor) for t in values.values()):
            return f"{', '.join(n for n, t in values.items() if not isinstance(t, torch.Tensor))} is not a tensor"
        q, cos = values["q"], values["cos"]
        sin = values.get("sin", cos)  # the complex form's one table is bound as cos
        xs = [q, values["k"]] if form.tensors == 2 else [q]
        if any(x.dim() != 4 for x in xs) or cos.dim() != 3 or sin.shape != cos.shape:
            return f"expects 4-D q/k and 3-D cos/sin, got q {tuple(q.shape)}, cos {tuple(cos.shape)}"
        d = q.shape[-1]
        if not isinstance(d, int) or any(x.shape[-1] != d for x in xs):
            return f"q/k head widths differ or are not static: {[tuple(x.shape) for x in xs]}"
        r = d
        if form.partial:
            cut = m["r"]
            if not isinstance(cut, int):
                return f"the rotated slice is cut at {cut!r}, not a constant"
            r = cut if form.partial == "first" else -cut
            if not 0 < r <= d:
                return f"the rotated slice ({form.partial} {r} of {d} channels) is empty or not inside the head"
        if r % 2:
            return f"rotates an odd number of channels ({r})"
        if form.rotation in ("rotate_half", "rotate_half_neg") and m["h"] * 2 != r:
            return f"rotate_half splits at {m['h']}, not at half of the {r} rotated channels"
        if form.rotation == "complex":
            if cos.dtype != torch.complex64:
                return f"the complex table is {cos.dtype}, not complex64"
            leads = [tuple(m[f"{n}{i}"] for i in range(3)) for n in ("q", "k")[:form.tensors]]
            if any(lead != tuple(x.shape[:3]) for lead, x in zip(leads, xs)):
                return f"view_as_complex reads a reshape to {leads}, not to pairs of q/k's own channels"
        if "z" in m.bindings and m["z"] not in (None, 0):
            return f"the even channels are taken from {m['z']}, not from 0"
        width = m["hc"] if form.tables in ("half_repeat", "half_unsqueeze") else cos.shape[-1]
        want = r // 2 if form.angle_per_pair else r
        if not isinstance(width, int) or width != want or (width > cos.shape[-1]):
            kind = "one angle per pair" if form.angle_per_pair else "one per channel"
            return f"cos/sin give {width} entries where {r} rotated channels need {want} ({kind})"
        head_axis = 2 if form.tables in ("index_repeat", "index") else m["udim"]
        head_axis = head_axis + 4 if isinstance(head_axis, int) and head_axis < 0 else head_axis
        if head_axis not in (1, 2):
            return f"cos/sin unsqueezed at dim {m['udim']}"
        seq_axis = 3 - head_axis
        if any(x.shape[seq_axis] != cos.shape[1] or x.shape[0] != q.shape[0] for x in xs):
            return "cos/sin do not cover q/k's sequence axis, or q and k batches differ"
        # cos/sin may be wider than q/k (fp32 tables under bf16 autocast): the op promotes as eager does
        if (q.dtype not in FLOAT_DTYPES or any(x.dtype != q.dtype for x in xs)
                or _table_dtype(cos) not in FLOAT_DTYPES or sin.dtype != cos.dtype):
            return f"dtypes differ or are unsupported: q {q.dtype}, cos {cos.dtype}, sin {sin.dtype}"
        casts = [m.dtype(n) for n in ("dt", "dtk")[:form.tensors]] if form.casts else []
        if any(dt not in FLOAT_DTYPES for dt in casts):
            return f"the fp32 result is cast to {casts}"
        if cos.shape[0] not in (1, q.shape[0]):
            return "cos/sin batch is neither 1 nor q's batch"
        return None

    return check


# --- near misses -----------------------------------------------------------------------------------------------
def _sliced(node) -> bool:
    """A slice of a tensor (or a piece of a chunk)."""
    if not isinstance(node, torch.fx.Node):
        return False
    if op_name(node) == "getitem" and node.args and isinstance(node.args[0], torch.fx.Node):
        return op_name(node.args[0]) == "chunk" or isinstance(node.args[1], (slice, tuple))
    return op_name(node) in ("getitem", "narrow", "slice", "chunk")


def _times_slice(node) -> bool:
    return isinstance(node, torch.fx.Node) and op_name(node) == "mul" and any(_sliced(a) for a in node.args)


def rotary_anchor(node) -> bool:
    """A candidate rotary site: the negation of a slice (rotate_half's `-x[..., half:]`, rotate_every_two's
    `-x[..., 1::2]`), a difference of products of slices (DeepSeek's `x1 * cos - x2 * sin`), or a tensor viewed
    as complex numbers; not any negation (a loss's `-log_probs.sum()`)."""
    name = op_name(node)
    if name == "neg":
        return bool(node.args) and _sliced(node.args[0])
    if name == "sub":
        return len(node.args) == 2 and all(_times_slice(a) for a in node.args)
    return name == "view_as_complex"


def _pattern(form: Form) -> Pattern:
    return Pattern("rotary", form.name, _search(form), _replace(form), _check(form), anchor=rotary_anchor)


PATTERNS = [_pattern(f) for f in FORMS + ONE_TENSOR_FORMS]
__all__ = ["PATTERNS", "FORMS", "ONE_TENSOR_FORMS", "Form", "example_value"]
