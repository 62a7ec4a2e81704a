"""`mode` and `options` of `torch.compile(..., backend="liger")`: ours, validated, and Inductor's, passed through."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

# Our options, with what each means. Every other key must be a torch._inductor.config key.
OUR_OPTIONS = {
    "dump": "directory: write each graph before/after the rewrite and its report there (also LIGER_COMPILE_DUMP)",
    "disable": "a pattern name or a list of them not to fuse, e.g. 'rms_norm' or ['rms_norm', 'rotary'] (also "
               "LIGER_COMPILE_DISABLE, comma-separated)",
    "enable": "a pattern name or a list of them to fuse that are off by default, e.g. 'qkv_projection' (also "
              "LIGER_COMPILE_ENABLE, comma-separated, for runs that cannot pass options: the trainers)",
    "fallback": "bool, default True: on an error inside our rewrite, compile the untouched graph with Inductor",
    "inductor": "bool, default True: False runs the rewritten graph eagerly instead of compiling it (debugging)",
    "offload_activations": "bool, default False: activations saved for backward (1 MiB and larger) wait in CPU memory "
                           "until backward needs them; meant with gradient checkpointing, where they are the layer "
                           "inputs (also LIGER_COMPILE_OFFLOAD_ACTIVATIONS=1)",
    "report": "a liger_compile.Report to collect the per-graph reports into",
    "skip_logits": "bool, default True: in training, a fused loss returns logits as a LazyTensor computed only if "
                   "read; False makes the fused op write real logits (input dtype, chunk by chunk)",
}


@dataclass
class Options:
    dump: str | None = None
    disable: tuple[str, ...] = ()
    enable: tuple[str, ...] = ()
    fallback: bool = True
    inductor: bool = True
    offload_activations: bool = False
    report: Any = None
    skip_logits: bool = True
    inductor_config: dict[str, Any] = field(default_factory=dict)


def _inductor_keys() -> set[str]:
    import torch._inductor.config as config  # noqa: PLC0415

    return set(config.get_config_copy())


def _fail(key: str, value: Any, wanted: str) -> None:
    raise ValueError(f"liger_compile: option {key!r} must be {wanted}, got {value!r} ({type(value).__name__})")


def _pattern_names(value: Any, key: str = "disable") -> tuple[str, ...]:
    """`disable` / `enable`: one name or an iterable of names, each a pattern the backend knows."""
    from .pattern import pattern_names  # noqa: PLC0415 - pattern discovery imports the ops

    if isinstance(value, str):
        names = (value,)
    else:
        try:
            names = tuple(value)
        except TypeError:
            names = None
        if names is None or not all(isinstance(n, str) for n in names):
            _fail(key, value, "a pattern name or a list of pattern names")
    valid = pattern_names()
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise ValueError(f"liger_compile: option {key!r} names unknown pattern(s) {unknown}; valid names: "
                         f"{', '.join(valid)}")
    return names


def _checked(key: str, value: Any) -> Any:
    """Our option `key`'s value, in the type Options holds, or a ValueError saying what it must be."""
    from .report import Report  # noqa: PLC0415

    if key in ("disable", "enable"):
        return _pattern_names(value, key)
    if key in ("fallback", "inductor", "offload_activations", "skip_logits"):
        if not isinstance(value, bool):
            _fail(key, value, "True or False")
        return value
    if key == "dump":
        if value is not None and not isinstance(value, (str, os.PathLike)):
            _fail(key, value, "a directory path (str or os.PathLike) or None")
        return os.fspath(value) if value is not None else None
    if key == "report":
        if value is not None and not isinstance(value, Report):
            _fail(key, value, "a liger_compile.Report or None")
        return value
    raise AssertionError(f"option {key!r} has no check")  # every key of OUR_OPTIONS is handled above


def parse(mode: str | None = None, options: dict | None = None) -> Options:
    from torch._inductor import list_mode_options  # noqa: PLC0415

    opts = Options(dump=os.environ.get("LIGER_COMPILE_DUMP") or None)
    for key in ("enable", "disable"):  # the trainers' torch_compile_backend="liger" cannot pass options
        names = [n.strip() for n in os.environ.get(f"LIGER_COMPILE_{key.upper()}", "").split(",") if n.strip()]
        if names:
            setattr(opts, key, _pattern_names(names, key))
    offload = os.environ.get("LIGER_COMPILE_OFFLOAD_ACTIVATIONS", "").strip()
    if offload not in ("", "0", "1"):
        raise ValueError(f"liger_compile: LIGER_COMPILE_OFFLOAD_ACTIVATIONS must be 0 or 1, got {offload!r}")
    opts.offload_activations = offload == "1"
    if mode not in (None, "default"):
        try:
            opts.inductor_config.update(list_mode_options(mode))
        except (KeyError, RuntimeError):
            valid = ", ".join(list_mode_options())
            raise ValueError(f"liger_compile: unknown mode {mode!r}; valid modes: {valid}") from None
    if options is not None and not isinstance(options, dict):
        raise ValueError(f"liger_compile: options must be a dict, got {type(options).__name__}")
    options = dict(options or {})
    unknown = []
    inductor_keys = None
    for key, value in options.items():
        if key in OUR_OPTIONS:
            setattr(opts, key, _checked(key, value))
            continue
        inductor_keys = inductor_keys if inductor_keys is not None else _inductor_keys()
        if key in inductor_keys:
            opts.inductor_config[key] = value
        else:
            unknown.append(key)
    if unknown:
        ours = "\n".join(f"  {k}: {v}" for k, v in OUR_OPTIONS.items())
        raise ValueError(
            f"liger_compile: unknown option(s) {unknown}. Valid options are ours:\n{ours}\n"
            "or any torch._inductor.config key (e.g. 'max_autotune', 'triton.cudagraphs')."
        )
    return opts
