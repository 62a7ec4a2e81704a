"""Every causal-LM type of transformers, tiny and random, trained one step under backend="liger" against eager.

    python tests/model_sweep.py --out bench/results/coverage.json [--types llama,qwen3] [--workers 2] [--markdown]

For each type of `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`: a tiny config from one generic set of sizes (`tiny_config`),
the model (SDPA attention where it is accepted; random init, fp32), an eager forward and backward on a 2 x 8 batch
(labels = input ids), then the same step through `torch.compile(model, backend="liger", options={"inductor": False,
"report": report})`. The loss and every parameter gradient must match eager's (rtol/atol 1e-4). Beside the report's
fused counts stand the sites the model itself ran in the forward pass of the eager step (`ModelSites`): calls of
modules whose class name ends in RMSNorm or LayerNorm (a norm module calling another one, a gated wrapper, counts as
the norm inside it; calls while autograd runs a backward pass, a reversible layer recomputing its forward, do not
count), calls of functions and methods named `apply_*rotary*` / `apply_*rope*` in the model's modules and classes,
and calls of MLP modules with gate/up/down projections. A fused site counts as often as its compiled graph ran (one
graph may serve every layer of a model whose layers break the graph). Calls that ran outside every compiled graph in
the compiled step (a frame Dynamo ran eagerly) are counted apart (`outside_graphs`): the backend never saw them.

Each type runs in a process of its own, forked from a server that imported torch and transformers once, under a
memory cap (RLIMIT_AS) and a time limit: a type whose config or model cannot be built, whose eager step fails or is
not deterministic, or that runs out of memory or time is recorded as `skipped` with the reason (and the phase). A
compiled step that raises is a `crash`, one that differs a `mismatch`; both are then diagnosed: the same step under
backend="eager" (Dynamo alone: is it ours?), under backend="liger" with every pattern disabled, and with each one
disabled in turn (which one?). A rewrite that fell back to the unchanged graph is listed too (`fallbacks`).

No model type is named in liger_compile/, patterns/ or kernels/; the few per-type config tweaks the generic rules
cannot express live in `TWEAKS` below, each with its reason.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import multiprocessing
import multiprocessing.connection
import os
import re
import sys
import time
import traceback
from collections import Counter

if __name__ == "__main__":  # as tests/conftest.py does: our Triton kernels run in the interpreter without a GPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

BATCH, SEQ = 2, 8
RTOL = ATOL = 1e-4
TIMEOUT_S = 60.0  # build + eager step + compiled step
DIAGNOSE_S = 120.0  # the diagnosis of a crash or mismatch, after that
MEMORY_GIB = 4.0  # RLIMIT_AS of each type's process

# The generic tiny config: passed to every config class (the sizes of the brief).
CORE = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=64, use_cache=False, is_decoder=True)

# The same sizes under the other names configs give them, set only where the default config holds an int under
# that name (None often means "this part is absent", e.g. q_lora_rank, and stays None).
ALIASES = {
    32: ("n_embd", "n_embed", "d_model", "dim", "embed_dim", "emb_dim", "embedding_size", "word_embed_proj_dim",
         "hidden_dim",
         # Mamba's inner width, which must be its heads * head_dim (4 * 8)
         "mamba_d_ssm"),
    64: ("n_inner", "ffn_dim", "decoder_ffn_dim", "encoder_ffn_dim", "ffn_hidden_size", "intermediate_size_mlp",
         "dense_intermediate_size", "d_inner", "n_positions", "n_ctx", "max_source_positions",
         "max_target_positions"),
    2: ("n_layer", "n_layers", "num_layers", "decoder_layers", "encoder_layers", "num_decoder_layers",
        "num_encoder_layers", "swa_num_key_value_heads", "linear_num_key_heads", "index_n_heads"),
    4: ("n_head", "n_heads", "num_heads", "decoder_attention_heads", "encoder_attention_heads",
        "num_decoder_attention_heads", "num_encoder_attention_heads", "swa_num_attention_heads",
        "linear_num_value_heads", "linear_num_heads", "mamba_n_heads", "mamba_num_heads", "n_mamba_heads",
        "rotary_dim"),
    # MLA: the rotary part of a query/key head is as wide as `head_dim` (qk_head_dim = nope + rope is derived)
    8: ("qk_rope_head_dim", "qk_nope_head_dim", "swa_head_dim", "v_head_dim", "linear_key_head_dim",
        "linear_value_head_dim", "linear_head_dim", "mamba_d_head", "mamba_head_dim", "mamba_headdim",
        "index_head_dim", "d_head", "attention_head_size", "state_size", "ssm_state_size", "mamba_d_state",
        "time_step_rank", "hidden_size_per_layer_input"),
    16: ("kv_lora_rank", "q_lora_rank"),
    1: ("n_group", "topk_group", "num_expert_group", "first_k_dense_replace", "num_dense_layers",
        "mamba_n_groups", "n_groups",
        # Mamba's inner width (expand * hidden) must be its heads * head_dim = 4 * 8
        "expand", "mamba_expand"),
    # two layers are too few for some to reuse the keys and values of others
    0: ("num_kv_shared_layers",),
}
# MoE sizes, set where the config is a MoE one (it has an int per-expert width), even over a default None
MOE = {"moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "shared_intermediate_size": 32,
       "shared_experts_intermediate_size": 32,
       "moe_shared_expert_intermediate_size": 32, "expert_intermediate_size": 32,
       "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
       "num_experts_per_tok": 2, "num_experts_per_token": 2, "moe_topk": 2,
       "n_shared_experts": 1, "num_shared_experts": 1, "moe_num_shared_experts": 1}
MOE_MARKERS = ("moe_intermediate_size", "expert_intermediate_size", "num_experts", "num_local_experts",
               "n_routed_experts", "moe_num_experts")
LAYER_COUNTS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "decoder_layers")
# Randomness in a training step (dropout, layer drop, router noise) would make eager and compiled steps differ.
RANDOM = re.compile(r"dropout|pdrop|layerdrop|drop_path|jitter", re.I)
TOKEN_ID = re.compile(r"_token_ids?$|_token_index$|_token$|^(pad|bos|eos|sep|cls|mask)_id$")
VOCAB = re.compile(r"vocab_size")

# Per-type tweaks the generic rules cannot express: type -> (config kwargs, why). Kept few: each is a fact of that
# type's config that its defaults do not satisfy, or an input its forward insists on.
TWEAKS: dict[str, tuple[dict, str]] = {
    "zaya": ({"num_experts_per_tok": 1}, "its config validator accepts num_experts_per_tok=1 only"),
    "lfm2_moe": ({"layer_types": ["conv", "full_attention"]},
                 "its default config has layer_types=None, which the model indexes (the default does not build)"),
    "zamba": ({"num_hidden_layers": 3, "layers_block_type": ["linear_attention", "hybrid", "hybrid"]},
              "the shared transformer block is tied across hybrid layers: with one hybrid layer there is nothing to "
              "tie it to and the model refuses to build"),
    "reformer": ({"axial_pos_embds_dim": [16, 16], "axial_pos_shape": [2, 4], "attn_layers": ["local", "local"],
                  "local_attn_chunk_length": 4},
                 "axial position embeddings must factor the hidden size and the sequence; LSH attention hashes with "
                 "fresh random rotations each call (eager and compiled would differ), so local attention only"),
}
# type -> (call on the built model, why): the same standing as TWEAKS
AFTER_BUILD: dict[str, tuple[object, str]] = {
    "xmod": (lambda model: model.set_default_language(model.config.languages[0]),
             "its forward needs a language (lang_ids or set_default_language)"),
}

# the model's sites by kind -> the report's patterns that fuse them (layer_norm where the backend has that pattern)
PATTERN_KINDS = {"rms_norm": ("rms_norm",), "layer_norm": ("layer_norm",), "rotary": ("rotary",),
                 "gated_mlp": ("swiglu", "geglu")}
NORMS = ("rms_norm", "layer_norm")  # a norm module holds a site of either (a T5-style "LayerNorm" is an RMSNorm)


# ---------------------------------------------------------------------------------------------------------------
# the tiny config


def _layers(fields: dict) -> int | None:
    return next((fields[k] for k in LAYER_COUNTS if type(fields.get(k)) is int), None)


def _two_layers(values):
    """A per-layer list for two layers: one of each of its first two kinds (a sliding and a full attention layer,
    a mamba and an attention layer), else its first two entries. A dict keyed by layer index (per-layer
    overrides): layer 0's entry if it has one, and its first other entry for layer 1."""
    if isinstance(values, dict):
        keys = sorted(values, key=int)
        if int(keys[0]) != 0:
            return {1: values[keys[0]]}
        return {0: values[keys[0]], **({1: values[keys[1]]} if len(keys) > 1 else {})}
    kinds = list(dict.fromkeys(v for v in values if isinstance(v, (str, int, float, bool, type(None)))))
    return kinds[:2] if len(kinds) >= 2 else list(values[:2])


def _per_layer_dict(value, n_layers) -> bool:
    return (isinstance(value, dict) and value and all(str(k).isdigit() for k in value)
            and max(int(k) for k in value) >= 2 and max(int(k) for k in value) < n_layers)


def _is_config(obj) -> bool:
    from transformers import PretrainedConfig  # noqa: PLC0415

    return isinstance(obj, PretrainedConfig)


def _settable(cls, name: str) -> bool:
    """False for a read-only property of the config class (a value it derives, e.g. head_dim)."""
    attr = getattr(cls, name, None)
    return not (isinstance(attr, property) and attr.fset is None)


def _hidden_sizes(config) -> set[int]:
    """The default hidden sizes of a config and of its sub-configs (text, vision, encoder, ...)."""
    sizes = {config.to_dict().get("hidden_size")} - {None}
    for key in getattr(type(config), "sub_configs", {}) or {}:
        if _is_config(getattr(config, key, None)):
            sizes |= _hidden_sizes(getattr(config, key))
    return sizes


WIDTH = re.compile(r"hidden_size|_dim$|_input_size$")


def shrink_kwargs(default, hidden_sizes: set[int] = frozenset()) -> dict:
    """The generic overrides for a config like `default` (a default-constructed config); `hidden_sizes`: the
    default hidden sizes of the whole model, whose config `default` is part of."""
    cls, fields = type(default), default.to_dict()
    kw = dict(CORE)
    # a width equal to one of the model's hidden sizes, or twice one, is that (an adapter's input, an attention
    # block over [hidden, embeddings]): the same multiple of the tiny hidden size
    for name, value in fields.items():
        if WIDTH.search(name) and type(value) is int and name not in kw:
            for k in (1, 2):
                if value in {k * h for h in hidden_sizes}:
                    kw[name] = k * CORE["hidden_size"]
    for value, names in ALIASES.items():
        for name in names:
            if name not in kw and type(fields.get(name)) is int:
                kw[name] = value
    if any(type(fields.get(m)) is int for m in MOE_MARKERS):
        aliases = getattr(cls, "attribute_map", {}) or {}
        kw.update({k: v for k, v in MOE.items() if k in fields or k in aliases})
    if type(fields.get("kv_lora_rank")) is int:  # MLA: keys and values are expanded for every head
        kw["num_key_value_heads"] = kw["num_attention_heads"]
    n_default = _layers(fields)
    next_id = iter(range(3, 64))
    for name, value in fields.items():
        if name in kw or name.endswith("_config"):
            continue
        if RANDOM.search(name) and isinstance(value, float):
            kw[name] = 0.0
        elif VOCAB.search(name) and type(value) is int:
            kw[name] = CORE["vocab_size"]
        elif isinstance(value, list) and n_default and len(value) == n_default and n_default != 2:
            kw[name] = _two_layers(value)
        elif n_default and _per_layer_dict(value, n_default):
            kw[name] = _two_layers(value)
        elif TOKEN_ID.search(name):
            kw[name] = _in_vocab(name, value, next_id)
    return {k: v for k, v in kw.items() if _settable(cls, k)}


def _in_vocab(name: str, value, next_id):
    """Token ids inside the tiny vocab: pad 0, bos 1, eos 2 (decoder_start as bos), any other 3, 4, ...; ids
    already inside it are kept."""
    role = name.removeprefix("forced_").split("_token")[0].removesuffix("_id")
    fixed = {"pad": 0, "bos": 1, "eos": 2, "decoder_start": 1}

    def one(v):
        if type(v) is not int or 0 <= v < CORE["vocab_size"]:
            return v
        return fixed[role] if role in fixed else next(next_id)

    return [one(v) for v in value] if isinstance(value, list) else one(value)


def tiny_config(model_type: str):
    """The config of `model_type` with the generic tiny sizes, applied to each sub-config too (text, vision, ...)."""
    from transformers import CONFIG_MAPPING  # noqa: PLC0415

    cls = CONFIG_MAPPING[model_type]
    default = cls()
    hidden = _hidden_sizes(default)
    kw = {**shrink_kwargs(default, hidden), **_tiny_subs(default, hidden)}
    kw.update(TWEAKS.get(model_type, ({}, ""))[0])
    while True:
        try:
            return cls(**kw)
        except NotImplementedError as e:  # a config that refuses one of the generic sizes (it derives it)
            text = str(e)
            refused = [k for k in CORE if k in kw and (f"`{k}`" in text or f" {k} " in text)] or [
                k for k in ("max_position_embeddings",) if k in kw and "sequence length" in text]
            if not refused:
                raise
            for k in refused:
                kw.pop(k)


def _tiny_subs(config, hidden: set[int]) -> dict:
    """The tiny versions of `config`'s sub-configs: each its parent's default one with the generic overrides."""
    out = {}
    for key in getattr(type(config), "sub_configs", {}) or {}:
        sub = getattr(config, key, None)
        if not _is_config(sub):
            continue
        kw = {**shrink_kwargs(sub, hidden), **_tiny_subs(sub, hidden)}
        base = {k: v for k, v in sub.to_dict().items() if k not in ("transformers_version", "architectures")}
        try:  # the parent's defaults for it (they may differ from the sub-config class's own), overridden
            out[key] = type(sub)(**{**base, **kw})
        except Exception:  # noqa: BLE001 - a serialised field its constructor does not take back: the class's own
            out[key] = type(sub)(**kw)
    return out


def special_ids(cfg) -> set[int]:
    """Every token id a config names (its sub-configs' included): kept out of the batch, so that no image or audio
    placeholder token asks for features the batch does not have."""
    ids = set()
    for name, value in cfg.to_dict().items():
        if isinstance(value, dict):
            continue
        if TOKEN_ID.search(name):
            for v in value if isinstance(value, list) else [value]:
                if type(v) is int:
                    ids.add(v)
    for key in getattr(type(cfg), "sub_configs", {}) or {}:
        sub = getattr(cfg, key, None)
        if _is_config(sub):
            ids |= special_ids(sub)
    return ids


def make_batch(cfg, seed: int = 1):
    import torch  # noqa: PLC0415

    allowed = torch.tensor(sorted(set(range(CORE["vocab_size"])) - special_ids(cfg)))
    g = torch.Generator().manual_seed(seed)
    ids = allowed[torch.randint(0, len(allowed), (BATCH, SEQ), generator=g)]
    return {"input_ids": ids, "labels": ids.clone()}


def build(model_type: str):
    """(model, config, attention implementation) for `model_type`, random init (seed 0), fp32, training mode.

    SDPA attention where the class accepts it, else its default (eager). A causal-LM class whose config is a
    sub-config of the type's config (a decoder inside a composite config) is built from that sub-config."""
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES  # noqa: PLC0415

    cfg = tiny_config(model_type)
    model_cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
    own = getattr(model_cls, "config_class", None)
    if own is not None and not isinstance(cfg, own):
        subs = getattr(type(cfg), "sub_configs", {}) or {}
        cfg = next((getattr(cfg, k) for k in subs if isinstance(getattr(cfg, k, None), own)), cfg)

    def make(attn):
        torch.manual_seed(0)
        return model_cls._from_config(cfg, attn_implementation=attn, dtype=torch.float32)

    try:
        model = make("sdpa")
    except ValueError as e:
        if "scaled_dot_product_attention" not in str(e) and "sdpa" not in str(e).lower():
            raise
        model = make("eager")
    model.float().train()
    if model_type in AFTER_BUILD:
        AFTER_BUILD[model_type][0](model)
    return model, cfg, getattr(model.config, "_attn_implementation", None)


def default_builds(model_type: str) -> str:
    """Whether the type's default config builds its causal-LM model (on the meta device: no memory): tells a
    failure of the tiny config from one of the defaults."""
    import torch  # noqa: PLC0415
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM  # noqa: PLC0415

    try:
        with torch.device("meta"):
            AutoModelForCausalLM.from_config(CONFIG_MAPPING[model_type]())
        return "yes"
    except BaseException as e:  # noqa: BLE001
        return f"no: {_first_line(e, 200)}"


# ---------------------------------------------------------------------------------------------------------------
# what the model itself calls


ROTARY_FN = re.compile(r"^apply_\w*(rotary|rope)", re.I)


class ModelSites:
    """Counts, during one eager step, the norm, rotary and gated-MLP sites the model runs: forward hooks on modules
    whose class name says RMSNorm / LayerNorm and on MLP modules with gate/up/down projections; the functions
    `apply_*rotary*` / `apply_*rope*` of the model's modules wrapped, and methods of that name of the model's module
    classes. `with ModelSites(model) as sites: step()`.

    A call is a site of the forward pass the compiled model runs: calls made while autograd runs a backward pass
    (a reversible layer recomputing its forward, activation checkpointing) are not counted, nor is a rotary
    function called inside a counted one. A norm module whose call runs another norm module (a gated norm
    wrapping a plain one) is a wrapper: the norm it calls is the site, the wrapper is not counted."""

    def __init__(self, model):
        self.model = model
        self.calls: Counter = Counter()
        self.called: Counter = Counter()  # (kind, module path) of the norm and MLP modules that ran -> calls
        self._undo = []
        self._norms: list[list] = []  # the norm modules being called, innermost last: [path, holds a norm]
        self._rotary_depth = 0

    NORM_CLASS = re.compile(r"(rms_?norm|layer_?norm)(gated)?$", re.I)  # LlamaRMSNorm, T5LayerNorm, RMSNormGated

    @classmethod
    def norm_kind(cls, module) -> str | None:
        import torch  # noqa: PLC0415

        m = cls.NORM_CLASS.search(type(module).__name__)
        if m:
            return "rms_norm" if m.group(1).lower().startswith("rms") else "layer_norm"
        return "layer_norm" if isinstance(module, torch.nn.LayerNorm) else None

    @staticmethod
    def mlp_kind(module, config) -> str | None:
        """'swiglu' / 'geglu' / 'gated_other' for a dense gated MLP, 'gated_experts' for MoE experts held as 3-d
        parameters, None for anything else."""
        import torch  # noqa: PLC0415

        has = lambda n: getattr(module, n, None) is not None  # noqa: E731
        gated = has("down_proj") and ((has("gate_proj") and has("up_proj")) or has("gate_up_proj"))
        gated = gated or (has("w1") and has("w2") and has("w3"))
        if not gated:
            return None
        proj = getattr(module, "gate_up_proj", None)
        proj = getattr(module, "gate_proj", None) if proj is None else proj
        if isinstance(proj, torch.nn.Parameter) and proj.dim() == 3:
            return "gated_experts"
        act = next((getattr(module, n) for n in ("act_fn", "act", "activation_fn", "activation")
                    if getattr(module, n, None) is not None), None)
        act = type(act).__name__ if act is not None else str(getattr(config, "hidden_act", ""))
        act = act.lower()
        if "silu" in act or "swish" in act:
            return "swiglu"
        if "gelu" in act:
            return "geglu"
        return "gated_other"

    @classmethod
    def site_modules(cls, model) -> list[tuple[str, object, str]]:
        """(path, module, kind) of the model's norm and MLP modules."""
        config = getattr(model.config, "text_config", None) or model.config
        found = []
        for path, module in model.named_modules():
            kind = cls.norm_kind(module) or cls.mlp_kind(module, config)
            if kind is not None:
                found.append((path, module, kind))
        return found

    @staticmethod
    def rotary_functions(model):
        """(owner, name, attribute, function) of the rotary functions the model's modules define, and of the
        rotary methods (a static one too) of its module classes."""
        for mod in {sys.modules[type(m).__module__] for m in model.modules()}:
            for name, fn in list(vars(mod).items()):
                if callable(fn) and not isinstance(fn, type) and ROTARY_FN.match(name):
                    yield mod, name, fn, fn
        for cls in {type(m) for m in model.modules()}:
            for name, attr in list(vars(cls).items()):
                fn = attr.__func__ if isinstance(attr, staticmethod) else attr
                if ROTARY_FN.match(name) and callable(fn) and not isinstance(fn, (type, classmethod)):
                    yield cls, name, attr, fn

    def __enter__(self):
        for path, module, kind in self.site_modules(self.model):
            if kind in NORMS:
                pre = module.register_forward_pre_hook(functools.partial(self._norm_starts, path))
                self._undo.append(pre.remove)
            self._undo.append(module.register_forward_hook(functools.partial(self._hook, kind, path)).remove)
        for owner, name, attr, fn in list(self.rotary_functions(self.model)):
            counted = self._counted(fn)
            setattr(owner, name, staticmethod(counted) if isinstance(attr, staticmethod) else counted)
            self._undo.append(functools.partial(setattr, owner, name, attr))
        return self

    def _norm_starts(self, path, module, args):
        if _in_backward():
            return
        for frame in self._norms:  # every norm module around this one is a wrapper
            frame[1] = True
        self._norms.append([path, False])

    def _hook(self, kind, path, module, args, output):
        if _in_backward():
            return
        if kind in NORMS:
            _, wraps_a_norm = self._norms.pop()
            if wraps_a_norm:
                return
        self.calls[kind] += 1
        self.called[_group(kind), path] += 1

    def _counted(self, fn):
        @functools.wraps(fn)
        def counted(*args, **kwargs):
            if not self._rotary_depth and not _in_backward():
                self.calls["rotary"] += 1
            self._rotary_depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._rotary_depth -= 1

        return counted

    def __exit__(self, *exc):
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()

    def counts(self) -> dict[str, int]:
        c = {k: self.calls.get(k, 0) for k in ("rms_norm", "layer_norm", "rotary", "swiglu", "geglu", "gated_other",
                                               "gated_experts")}
        c["gated_mlp"] = c["swiglu"] + c["geglu"] + c["gated_other"]
        return c


def _in_backward() -> bool:
    import torch  # noqa: PLC0415

    return torch._C._current_graph_task_id() != -1


def _group(kind: str) -> str:
    return "gated_mlp" if kind in ("swiglu", "geglu", "gated_other") else kind


class OutsideGraphs(ModelSites):
    """Counts, around the compiled step, the calls of the same sites that ran outside every compiled graph: a frame
    Dynamo gave up on and ran eagerly (a loop around a data-dependent graph break). The backend never saw them.

    Dynamo runs a frame it compiled as its own code object, one it gave up on as the original: a call of a site's
    original code is one no graph holds. Read with sys.setprofile, off while Dynamo compiles (it runs much Python);
    hooks or wrappers would be traced by Dynamo and change the graphs being measured. A norm module holding another
    one (a wrapper) is not counted."""

    def __enter__(self):
        import torch  # noqa: PLC0415

        self._codes, self._modules = {}, {}
        norms = [(p, m) for p, m, k in self.site_modules(self.model) if k in NORMS]
        for path, module, kind in self.site_modules(self.model):
            if kind in NORMS and any(q.startswith(path + ".") for q, _ in norms):
                continue
            code = getattr(type(module).forward, "__code__", None)
            if code is not None:
                self._codes[code] = "module"
                self._modules[id(module)] = (kind, path)
        for *_, fn in self.rotary_functions(self.model):
            code = getattr(fn, "__code__", None)
            if code is not None:
                self._codes[code] = "rotary"
        handler = torch._dynamo.callback.callback_handler
        self._off = handler.register_start_callback(lambda _: sys.setprofile(None))
        self._on = handler.register_end_callback(lambda _: sys.setprofile(self._profile))
        sys.setprofile(self._profile)
        return self

    def _profile(self, frame, event, arg):
        if event != "call":
            return
        what = self._codes.get(frame.f_code)
        if what is None or _in_backward():
            return
        if what == "rotary":
            self.calls["rotary"] += 1
            return
        site = self._modules.get(id(frame.f_locals.get("self")))
        if site is not None:
            kind, path = site
            self.calls[kind] += 1
            self.called[_group(kind), path] += 1

    def __exit__(self, *exc):
        import torch  # noqa: PLC0415

        sys.setprofile(None)
        handler = torch._dynamo.callback.callback_handler
        for callbacks, fn in ((handler.start_callbacks, self._off), (handler.end_callbacks, self._on)):
            if fn in callbacks:  # (a torch._dynamo.reset() in between has dropped them)
                callbacks.remove(fn)


# ---------------------------------------------------------------------------------------------------------------
# one type


def loss_and_grads(model, inputs, run=None):
    model.zero_grad(set_to_none=True)
    out = (model if run is None else run)(**inputs)
    loss = out["loss"] if isinstance(out, dict) else out.loss
    if loss is None:
        raise ValueError("the model returned no loss for labels=input_ids")
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach().clone(), grads


def compare(ref, got) -> dict:
    """Max abs differences of loss and gradients, the worst parameter, and whether all are within tolerance."""
    import torch  # noqa: PLC0415

    (ref_loss, ref_grads), (loss, grads) = ref, got
    out = {"loss": float((loss - ref_loss).abs()), "grads": 0.0, "worst_param": None, "mismatched_params": [],
           "missing_grads": sorted(set(ref_grads) ^ set(grads))}
    close = torch.allclose(loss, ref_loss, rtol=RTOL, atol=ATOL) and not out["missing_grads"]
    for name in ref_grads.keys() & grads.keys():
        a, b = grads[name], ref_grads[name]
        d = float((a - b).abs().max()) if a.numel() else 0.0
        if not (d <= out["grads"]):  # NaN too
            out["grads"], out["worst_param"] = d, name
        if a.shape != b.shape or not torch.allclose(a, b, rtol=RTOL, atol=ATOL):
            out["mismatched_params"].append(name)
    out["mismatched_params"].sort()
    out["close"] = close and not out["mismatched_params"]
    return out


def compiled_step(model, inputs, report=None, options=None, backend="liger", runs=None, outside=None):
    """Loss and gradients of one step through torch.compile: backend="liger" with our ops run eagerly (no
    Inductor), collecting into `report` (it keeps what was compiled before a crash), or another backend.
    `runs` (a Counter) gets, per graph of the report (by id), how many times its compiled function ran: a graph
    Dynamo compiled once may serve several calls (each layer of a model whose layers break the graph).
    `outside`: an OutsideGraphs to count the sites run outside the compiled graphs with."""
    import contextlib  # noqa: PLC0415

    import torch  # noqa: PLC0415

    import liger_compile  # noqa: PLC0415

    torch._dynamo.reset()  # (also drops Dynamo's compile callbacks: `outside` registers its own after it)
    if backend == "liger":
        report = liger_compile.Report() if report is None else report
        opts = {"inductor": False, "report": report, **(options or {})}
        runs = Counter() if runs is None else runs

        def counting(gm, example_inputs):
            before = len(report.graphs)
            fn = liger_compile.liger_backend(gm, example_inputs, options=opts)
            if len(report.graphs) == before:
                return fn
            key = id(report.graphs[-1])

            def run(*args):
                runs[key] += 1
                return fn(*args)

            return run

        compiled = torch.compile(model, backend=counting)
    else:
        compiled = torch.compile(model, backend=backend)
    with outside if outside is not None else contextlib.nullcontext():
        return loss_and_grads(model, inputs, run=compiled)


def _first_line(e: BaseException, n: int = 300) -> str:
    """The exception's type and first line; with the next line too where the first only introduces it (a config
    validator's "Class validation error for validator ...:")."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    text = f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    return f"{type(e).__name__}: {text[:n]}"


def _short_tb(e: BaseException) -> str:
    return "".join(traceback.format_exception(type(e), e, e.__traceback__))[-6000:]


def _memory_error(e: BaseException) -> bool:
    text = str(e)
    return isinstance(e, MemoryError) or "can't allocate memory" in text or "DefaultCPUAllocator" in text or (
        "std::bad_alloc" in text)


def run_type(model_type: str, send=lambda *msg: None, diagnose: bool = True) -> dict:
    """Build, eager step, compiled step and comparison for one type; `send(kind, payload)` reports progress."""
    import torch  # noqa: PLC0415

    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES  # noqa: PLC0415

    res = {"type": model_type, "model_class": MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type), "status": None,
           "reason": None, "seconds": {}, "tweak": TWEAKS.get(model_type, (None, None))[1]}
    t0 = time.perf_counter()

    def phase(name):
        res["phase"] = name
        send("phase", name)

    def took(name, start):
        res["seconds"][name] = round(time.perf_counter() - start, 2)

    try:
        phase("build")
        start = time.perf_counter()
        model, cfg, attn = build(model_type)
        res["attn_implementation"] = attn
        res["parameters"] = sum(p.numel() for p in model.parameters())
        inputs = make_batch(cfg)
        took("build", start)
        phase("eager")
        start = time.perf_counter()
        with ModelSites(model) as sites:
            ref = loss_and_grads(model, inputs)
        took("eager", start)
        res["model"] = sites.counts()
        called = sites.called
        if not torch.isfinite(ref[0]) or not all(torch.isfinite(g).all() for g in ref[1].values()):
            raise FloatingPointError("eager loss or gradients are not finite")
        again = compare(ref, loss_and_grads(model, inputs))
        if not again["close"]:  # randomness no generic rule switched off: no reference to compare with
            raise RuntimeError(f"two eager steps differ (loss by {again['loss']:.3g}, gradients by "
                               f"{again['grads']:.3g}): the step is not deterministic")
    except BaseException as e:  # noqa: BLE001 - every failure before the compiled step is a skip with its reason
        res["status"] = "skipped"
        res["reason"] = f"{'out of memory' if _memory_error(e) else res['phase']}: {_first_line(e)}"
        res["traceback"] = _short_tb(e)
        if res["phase"] == "build" and not _memory_error(e):
            res["default_config_builds"] = default_builds(model_type)
        res["seconds"]["total"] = round(time.perf_counter() - t0, 2)
        return res

    import liger_compile  # noqa: PLC0415

    phase("liger")
    start = time.perf_counter()
    report, runs = liger_compile.Report(), Counter()
    outside = OutsideGraphs(model)
    try:
        got = compiled_step(model, inputs, report, runs=runs, outside=outside)
        res["diff"] = compare(ref, got)
        res["status"] = "ok" if res["diff"]["close"] else "mismatch"
        if res["status"] == "mismatch":
            d = res["diff"]
            res["reason"] = (f"loss diff {d['loss']:.3g}, max grad diff {d['grads']:.3g} ({d['worst_param']}), "
                             f"{len(d['mismatched_params'])} params off" +
                             (f", grads missing on one side: {d['missing_grads'][:4]}" if d["missing_grads"] else ""))
    except BaseException as e:  # noqa: BLE001
        # out of memory is a skip in any phase (the memory cap is the sweep's, not the model's); the reason says where
        res["status"] = "skipped" if _memory_error(e) else "crash"
        res["reason"] = (f"out of memory in the liger step: {_first_line(e)}" if _memory_error(e)
                         else _first_line(e, 400))
        res["traceback"] = _short_tb(e)
    took("liger", start)
    res["outside_graphs"] = outside.counts()
    _add_report(res, report, called - outside.called, runs)
    res["seconds"]["total"] = round(time.perf_counter() - t0, 2)
    if res["status"] != "ok" and diagnose:
        send("partial", res)
        phase("diagnose")
        res["diagnosis"] = _diagnose(model, inputs, ref)
        res["seconds"]["total"] = round(time.perf_counter() - t0, 2)
    return res


def _add_report(res: dict, report, called, runs: Counter | None = None) -> None:
    """The report's sites against the model's: `called`, the (kind, module path) of the norm and MLP modules that
    ran in the compiled graphs; `runs`, how often each graph ran."""
    fused = report.counts
    res["fused"] = fused
    res["graphs"] = len(report.graphs)
    res["fallbacks"] = [f.splitlines()[0][:500] for f in report.fallbacks]
    res["near_misses"] = [{"pattern": m.pattern, "reason": m.reason, "where": m.where} for m in report.near_misses]
    # the sites the compiled graphs ran: those the backend saw
    outside = res.get("outside_graphs", {})
    model = {k: n - outside.get(k, 0) for k, n in res["model"].items()}
    # A site runs as often as its graph: the report lists each compiled graph once, and a graph compiled once may
    # serve several calls (every layer of a model that breaks the graph inside its layers)
    ran = {id(g): 1 if runs is None else runs.get(id(g), 0) for g in report.graphs}
    sites = {kind: [(s, ran[id(g)]) for g in report.graphs for s in g.fused if s.pattern in pats]
             for kind, pats in PATTERN_KINDS.items()}
    res["fused_calls"] = {p: sum(n for g in report.graphs for s in g.fused if s.pattern == p for n in [ran[id(g)]])
                          for p in fused}
    norm_sites = sites["rms_norm"] + sites["layer_norm"]
    # The model's norm and MLP modules that ran and hold no fused site. The report names a site by its module
    # paths (its output's and its ops'), relative to the module Dynamo compiled (the model, or a layer after a graph
    # break), or by its source line alone where the site is in no module of its graph: those are matched by count.
    res["unfused"], res["all_fused"] = {}, {}
    # A kind is all fused when no module of it is left without a site and its sites ran as often as its modules
    # were called. A norm module may hold either kind of fused norm (a T5-style "LayerNorm" is an RMSNorm): a
    # norm kind's sites are the fused norms inside its modules, and the norms in no module.
    for kind in (*NORMS, "gated_mlp"):
        modules = [p for k, p in called if k == kind]
        pool = sites[kind] if kind == "gated_mlp" else [
            (s, n) for s, n in norm_sites if _unpathed(s) or any(_covered(p, _paths(s)) for p in modules)]
        unpathed = sum(n for s, n in pool if _unpathed(s))
        res["unfused"][kind] = sorted(p for p in modules if not _covered(p, [w for s, _ in pool for w in _paths(s)]))
        res["all_fused"][kind] = not model[kind] or (
            len(res["unfused"][kind]) <= unpathed and sum(n for _, n in pool) >= model[kind])
    if "layer_norm" not in fused:  # no LayerNorm pattern in this backend: those sites are not ours to fuse
        del res["all_fused"]["layer_norm"]
    # rotary sites are calls of a function, not modules: by count (one fused site rotates q and k together)
    res["all_fused"]["rotary"] = sum(n for _, n in sites["rotary"]) >= model["rotary"]


def _paths(site) -> list[str]:
    """The module paths of a site: the module of its output, and every module one of its ops ran in (a norm
    module called with casts around it: the output is the caller's)."""
    where = site.where.split(" (")[0]
    return ([] if _unpathed(site) else [where]) + list(getattr(site, "modules", ()))


def _unpathed(site) -> bool:
    """A site in no module of its graph (a norm's own forward compiled as a frame): named by its source line."""
    return bool(re.match(r"^\S+\.py:\d+", site.where.split(" (")[0])) and not getattr(site, "modules", ())


def _covered(path: str, wheres: list[str]) -> bool:
    """Whether a fused site lies in module `path`: its module path is `path` or inside it, the site's path read
    relative to any enclosing module (any tail of `path`: a graph compiled on a module names its submodules
    from there, `layernorm` for `transformer.layernorm`)."""
    parts = path.split(".")
    tails = [".".join(parts[i:]) for i in range(len(parts))]
    return any(w == t or w.startswith(t + ".") for w in wheres for t in tails)


def _diagnose(model, inputs, ref) -> dict:
    """Is the failure Dynamo's own (backend="eager"), and which pattern's fusion does it take to fail?"""
    from liger_compile.pattern import pattern_names  # noqa: PLC0415

    def verdict(**kw) -> str:
        try:
            d = compare(ref, compiled_step(model, inputs, **kw))
        except BaseException as e:  # noqa: BLE001
            return f"crash: {_first_line(e, 200)}"
        return "ok" if d["close"] else f"mismatch: loss {d['loss']:.3g}, grads {d['grads']:.3g}"

    return {"dynamo_eager": verdict(backend="eager"),
            "liger_all_disabled": verdict(options={"disable": pattern_names()}),
            "passes_with_disabled": [name for name in pattern_names()
                                     if verdict(options={"disable": [name]}) == "ok"]}


# ---------------------------------------------------------------------------------------------------------------
# the sweep: one process per type


def _child(model_type: str, conn, memory_gib: float, log_path: str | None, diagnose: bool) -> None:
    import resource  # noqa: PLC0415

    fd = os.open(log_path or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)  # Dynamo's warnings
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    cap = int(memory_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    import warnings  # noqa: PLC0415

    warnings.filterwarnings("ignore")

    def send(kind, payload):
        conn.send((kind, payload))

    try:
        res = run_type(model_type, send, diagnose=diagnose)
    except BaseException as e:  # noqa: BLE001
        res = {"type": model_type, "status": "crash", "reason": f"sweep error: {type(e).__name__}: {e}",
               "traceback": _short_tb(e)}
    conn.send(("done", res))
    conn.close()


@functools.cache
def _context():
    ctx = multiprocessing.get_context("forkserver")
    # the server imports these once; each type's process is forked from it (no second import of torch)
    ctx.set_forkserver_preload(["torch", "transformers", "liger_compile", "model_sweep"])
    return ctx


@dataclasses.dataclass
class _Running:
    proc: object
    conn: object
    deadline: float
    started: float
    phase: str = "start"
    partial: dict | None = None


def sweep(types: list[str], workers: int = 2, timeout_s: float = TIMEOUT_S, diagnose_s: float = DIAGNOSE_S,
          memory_gib: float = MEMORY_GIB, log_dir: str | None = None, diagnose: bool = True,
          on_result=None) -> dict[str, dict]:
    """Runs each type in its own process, `workers` at a time; returns type -> result."""
    ctx = _context()
    pending, running, results = list(types), {}, {}
    if log_dir:
        os.makedirs(log_dir, exist_ok=True)

    def finish(t, res):
        results[t] = res
        if on_result is not None:
            on_result(res)

    while pending or running:
        while pending and len(running) < workers:
            t = pending.pop(0)
            parent, child = ctx.Pipe(duplex=False)
            log = os.path.join(log_dir, f"{t}.log") if log_dir else None
            proc = ctx.Process(target=_child, args=(t, child, memory_gib, log, diagnose), daemon=True)
            proc.start()
            child.close()
            running[t] = _Running(proc, parent, time.monotonic() + timeout_s, time.monotonic())
        ready = multiprocessing.connection.wait([r.conn for r in running.values()], timeout=1.0)
        for t, r in list(running.items()):
            done = None
            if r.conn in ready:
                try:
                    while r.conn.poll():
                        kind, payload = r.conn.recv()
                        if kind == "phase":
                            r.phase = payload
                            if payload == "diagnose":
                                r.deadline = time.monotonic() + diagnose_s
                        elif kind == "partial":
                            r.partial = payload
                        elif kind == "done":
                            done = payload
                except EOFError:  # the process ended; without a result, it died
                    if done is None:
                        r.proc.join(5)
                        done = _died(t, r)
            if done is None and time.monotonic() > r.deadline:
                r.proc.kill()
                r.proc.join(5)
                done = _timed_out(t, r, timeout_s, diagnose_s)
            if done is not None:
                r.proc.join(5)
                if r.proc.is_alive():
                    r.proc.kill()
                r.conn.close()
                del running[t]
                done["seconds"] = {**done.get("seconds", {}), "wall": round(time.monotonic() - r.started, 2)}
                finish(t, done)
    return {t: results[t] for t in types}


def _died(t: str, r: _Running) -> dict:
    code = r.proc.exitcode
    how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
    if r.partial is not None:  # died while diagnosing: the result stands
        return {**r.partial, "diagnosis": {"error": f"the process died while diagnosing ({how})"}}
    # like running out of memory or time, a skip in any phase (the reason says which): the memory cap kills a
    # process that a failed allocation takes down outright
    return {"type": t, "status": "skipped", "phase": r.phase,
            "reason": f"{r.phase}: the process died ({how}; the memory cap, or a crash in native code)"}


def _timed_out(t: str, r: _Running, timeout_s: float, diagnose_s: float) -> dict:
    if r.partial is not None:
        return {**r.partial, "diagnosis": {"error": f"diagnosis ran past {diagnose_s:.0f} s"}}
    return {"type": t, "status": "skipped", "phase": r.phase,
            "reason": f"timeout: {r.phase} still running after {timeout_s:.0f} s"}


def all_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES  # noqa: PLC0415

    return list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


# ---------------------------------------------------------------------------------------------------------------
# summary and output


def versions() -> dict:
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "date": datetime.date.today().isoformat(), "python": sys.version.split()[0]}


def _norm_reason(reason: str) -> str:
    """A near miss's reason with its site-specific parts (node names, numbers) blanked, to group."""
    r = re.sub(r"\(node [^)]*\)", "(node …)", reason)
    r = re.sub(r"graph input \w+", "graph input …", r)
    r = re.sub(r"\b([A-Za-z]\w*?)_\d+\b", r"\1_N", r)  # attention_mask_2
    return re.sub(r"\b\d+(\.\d+)?\b", "N", r)


BRIEF_KINDS = ("rms_norm", "rotary", "gated_mlp")  # the Liger-Kernel sites; LayerNorm is counted apart


def _fully(r: dict, kinds) -> bool:
    return all(r["all_fused"].get(k, True) for k in kinds)


def _calls(r: dict, kinds) -> bool:
    return any(r["model"][k] for k in kinds if k in r["all_fused"])


def summarize(results: dict[str, dict]) -> dict:
    rs = list(results.values())
    ran = [r for r in rs if r["status"] != "skipped" and "all_fused" in r]  # built, eager ran, compiled (or crashed)
    coverage = {}
    for name, kinds in (("rms_norm+rotary+gated_mlp", BRIEF_KINDS), ("all_kinds", tuple(PATTERN_KINDS))):
        calling = [r for r in ran if _calls(r, kinds)]
        coverage[name] = {"types": len(ran), "every_site_fused": sum(_fully(r, kinds) for r in ran),
                          "types_calling_one": len(calling),
                          "types_calling_one_every_site_fused": sum(_fully(r, kinds) for r in calling)}
    per_kind = {k: {"types_calling_it": sum(1 for r in ran if r["model"][k] and k in r["all_fused"]),
                    "every_site_fused": sum(1 for r in ran if r["model"][k] and r["all_fused"].get(k, False))}
                for k in PATTERN_KINDS}
    sites, types = Counter(), Counter()
    for r in rs:
        keys = [f"{m['pattern']}: {_norm_reason(m['reason'])}" for m in r.get("near_misses", [])]
        sites.update(keys)
        types.update(set(keys))
    return {"status": dict(Counter(r["status"] for r in rs)),
            "skipped_by_reason": dict(Counter(_skip_group(r["reason"]) for r in rs
                                              if r["status"] == "skipped").most_common()),
            "coverage": coverage, "per_kind": per_kind,
            "fallbacks": {r["type"]: r["fallbacks"] for r in rs if r.get("fallbacks")},
            "near_miss_reasons": [{"reason": k, "sites": n, "types": types[k]} for k, n in sites.most_common()]}


def _skip_group(reason: str) -> str:
    """A skip's reason to group by: the phase, the exception and its message with numbers blanked."""
    if reason.startswith("timeout") or "died" in reason:
        return reason.split(" after")[0].split(" (")[0]
    return re.sub(r"\b\d+\b", "N", reason)[:200]


def _cell(r: dict, kind: str) -> str:
    """fused/model for one kind, model counting the calls in compiled graphs (+ those Dynamo ran eagerly); ✗ where
    a site the model ran in a graph is not fused."""
    if "fused" not in r:
        return ""
    f = sum(r.get("fused_calls", r["fused"]).get(p, 0) for p in PATTERN_KINDS[kind])
    eager = r.get("outside_graphs", {}).get(kind, 0)
    m = r["model"][kind] - eager
    return f"{f}/{m}" + (f" (+{eager} eager)" if eager else "") + ("" if r["all_fused"].get(kind, True) else " ✗")


def _md(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(results: dict[str, dict], meta: dict) -> str:
    s = summarize(results)
    st, cov, cov_all = s["status"], s["coverage"]["rms_norm+rotary+gated_mlp"], s["coverage"]["all_kinds"]
    lines = [
        "# Model coverage: every transformers causal-LM type under backend=\"liger\"",
        "",
        f"Generated by `tests/model_sweep.py --markdown` on {meta['date']}: torch {meta['torch']}, "
        f"transformers {meta['transformers']}, Python {meta['python']}, CPU, fp32.",
        "",
        f"Each type: a tiny random config (vocab {CORE['vocab_size']}, hidden {CORE['hidden_size']}, "
        f"{CORE['num_hidden_layers']} layers, {CORE['num_attention_heads']} heads / {CORE['num_key_value_heads']} kv "
        f"heads of {CORE['head_dim']}; the same sizes under the other names configs use, in every sub-config too; "
        f"see `tests/model_sweep.py`), SDPA attention where the class accepts it, random init, one training step on "
        f"{BATCH} x {SEQ} tokens (labels = input ids) eager and under `torch.compile(model, backend=\"liger\", "
        f"options={{\"inductor\": False}})`: the loss and every parameter gradient within rtol/atol {RTOL:g}. "
        f"Each type in its own process: {meta.get('memory_gib', MEMORY_GIB):g} GiB address-space cap, "
        f"{meta.get('timeout_s', TIMEOUT_S):g} s limit."
        + (f" The sweep took {meta['seconds']:.0f} s with {meta['workers']} workers." if "seconds" in meta else ""),
        "",
        f"**{len(results)} types: {st.get('ok', 0)} ok, {st.get('mismatch', 0)} mismatch, {st.get('crash', 0)} "
        f"crash, {st.get('skipped', 0)} skipped.** Of the {cov['types']} types that built and ran, "
        f"{cov['every_site_fused']} have every RMSNorm, rotary and gated-MLP site they run fused "
        f"({cov['types_calling_one_every_site_fused']} of the {cov['types_calling_one']} that run at least one); "
        f"counting LayerNorm sites too, {cov_all['every_site_fused']} "
        f"({cov_all['types_calling_one_every_site_fused']} of {cov_all['types_calling_one']}).",
        "",
        "Columns *fused/model*: the calls of fused sites over the sites the model ran in the forward pass of its "
        "eager step; ✗ where one the model ran holds no fused site. A fused site counts once per run of its graph "
        "(a graph Dynamo compiled once may serve every layer of a model whose layers break the graph). Calls that "
        "ran outside every compiled graph under torch.compile (a frame Dynamo gave up on and ran eagerly) are not "
        "the backend's to fuse: shown as *(+n eager)* and left out of the model's count. rms_norm / "
        "LN: calls of modules whose class name ends in RMSNorm / LayerNorm (and `nn.LayerNorm`), matched to the "
        "fused sites by module path (a norm module holding either kind of fused norm counts as fused; a norm module "
        "that calls another one, a gated wrapper, is not a site of its own: the norm inside is; calls during the "
        "backward pass, a reversible layer recomputing its forward, are not counted); rotary: calls of functions "
        "and methods named `apply_*rotary*` / `apply_*rope*`, by count; gated MLP: calls of modules with "
        "gate/up/down projections, fused as swiglu or geglu, by module path (MoE experts held as 3-d parameters are "
        "not counted on the model's side, so fused can exceed it). lce: fused lm_head + cross-entropy; causal: "
        "attention masks rewritten to is_causal (both as the report counts them, once per compiled graph).",
        "",
        "| kind | types that run it | every site fused |",
        "|---|---|---|",
    ]
    for k, v in s["per_kind"].items():
        lines.append(f"| {k} | {v['types_calling_it']} | {v['every_site_fused']} |")
    lines += ["", "## Per type", "",
              "| type | status | rms_norm | LN | rotary | gated MLP | lce | causal | near misses | s |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for t, r in results.items():
        nm = Counter(m["pattern"] for m in r.get("near_misses", []))
        status = r["status"] + (f": {r['reason']}" if r["status"] != "ok" and r.get("reason") else "")
        status = _md(status)[:180] + (f" (rewrite fell back in {len(r['fallbacks'])} graph)" if r.get("fallbacks")
                                      else "")
        fused = r.get("fused", {})
        lines.append(f"| {t} | {status} | {_cell(r, 'rms_norm')} | {_cell(r, 'layer_norm')} | {_cell(r, 'rotary')} | "
                     f"{_cell(r, 'gated_mlp')} | {fused.get('linear_cross_entropy', '')} | "
                     f"{fused.get('causal_mask', '')} | {', '.join(f'{p} {n}' for p, n in nm.most_common())} | "
                     f"{r.get('seconds', {}).get('total', '')} |")
    bad = [r for r in results.values() if r["status"] in ("crash", "mismatch")]
    lines += ["", "## Crashes and mismatches", ""]
    for r in bad:
        lines.append(f"- **{r['type']}** ({r['status']}): {_md(r.get('reason', ''))}")
        if r.get("diagnosis"):
            lines.append(f"  diagnosis: {json.dumps(r['diagnosis'])}")
    lines += [] if bad else ["None."]
    lines += ["", "## Rewrites that fell back (the graph ran unfused: correct, but a bug)", ""]
    lines += [f"- **{t}**: {_md(f[0])[:400]}" for t, f in s["fallbacks"].items()] or ["None."]
    lines += ["", "## Near-miss reasons (node names and numbers blanked)", "", "| pattern: reason | sites | types |",
              "|---|---|---|"]
    for m in s["near_miss_reasons"]:
        lines.append(f"| {_md(m['reason'])} | {m['sites']} | {m['types']} |")
    lines += ["", "## Skipped, by reason", "", "| reason | types | their default config builds |", "|---|---|---|"]
    by_reason: dict[str, list[dict]] = {}
    for r in results.values():
        if r["status"] == "skipped":
            by_reason.setdefault(_skip_group(r["reason"]), []).append(r)
    for reason, rs in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
        default = "; ".join(f"{r['type']}: {r['default_config_builds']}" for r in rs if r.get("default_config_builds"))
        default = _md(default) or "not tried (the model built)"
        lines.append(f"| {_md(reason)} | {', '.join(r['type'] for r in rs)} | {default} |")
    lines += ["", "## Per-type tweaks (where no generic rule could do it)", ""]
    lines += [f"- {t}: config `{kw}`: {why}" for t, (kw, why) in TWEAKS.items()]
    lines += [f"- {t}: after building, {why}" for t, (_, why) in AFTER_BUILD.items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench/results/coverage.json")
    p.add_argument("--types", default="", help="comma-separated model types (default: all causal-LM types)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--timeout", type=float, default=TIMEOUT_S)
    p.add_argument("--memory-gib", type=float, default=MEMORY_GIB)
    p.add_argument("--logs", default=None, help="directory for each type's process output (default: discarded)")
    p.add_argument("--no-diagnose", action="store_true")
    p.add_argument("--markdown", nargs="?", const="", default=None,
                   help="also write the table (default: --out with .md)")
    p.add_argument("--from-json", action="store_true",
                   help="no sweep: recompute the summary and write the table from the results in --out")
    args = p.parse_args(argv)
    md = args.markdown or os.path.splitext(args.out)[0] + ".md"
    if args.from_json:
        with open(args.out) as f:
            saved = json.load(f)
        saved["summary"] = summarize(saved["results"])
        with open(args.out, "w") as f:
            json.dump(saved, f, indent=1, default=str)
        with open(md, "w") as f:
            f.write(markdown(saved["results"], saved["meta"]))
        return 0
    types = [t for t in args.types.split(",") if t] or all_types()
    meta = {**versions(), "workers": args.workers, "timeout_s": args.timeout, "memory_gib": args.memory_gib,
            "rtol": RTOL, "atol": ATOL, "batch": [BATCH, SEQ], "config": CORE,
            "tweaks": {t: {"kwargs": kw, "why": why} for t, (kw, why) in TWEAKS.items()},
            "after_build": {t: why for t, (_, why) in AFTER_BUILD.items()}}
    start = time.monotonic()

    def show(r):
        print(f"{r['type']:<28} {r['status']:<9} {r.get('seconds', {}).get('wall', '')!s:>6}s  "
              f"{(r.get('reason') or '')[:150]}", flush=True)

    results = sweep(types, workers=args.workers, timeout_s=args.timeout, memory_gib=args.memory_gib,
                    log_dir=args.logs, diagnose=not args.no_diagnose, on_result=show)
    meta["seconds"] = round(time.monotonic() - start, 1)
    out = {"meta": meta, "summary": summarize(results), "results": results}
    if os.path.dirname(args.out):
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1, default=str)
    if args.markdown is not None:
        with open(md, "w") as f:
            f.write(markdown(results, meta))
    print(json.dumps(out["summary"]["status"]), f"in {meta['seconds']} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import model_sweep  # the processes unpickle their target by module name: run it from there

    sys.exit(model_sweep.main())
