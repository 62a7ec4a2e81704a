"""`mode` and `options` of `torch.compile(..., backend="liger")`: ours, validated, and Inductor's, passed through."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

# Our options, with what each means. Every other key must be a torch._inductor.config key.
OUR_OPTIONS = {
    "dump": "directory: write each graph before/after the rewrite and its report there (also LIGER_COMPILE_DUMP)",
    "disable": "list of pattern names not to fuse, e.g. ['rms_norm']",
    "fallback": "bool, default True: on an error inside our rewrite, compile the untouched graph with Inductor",
    "inductor": "bool, default True: False runs the rewritten graph eagerly instead of compiling it (debugging)",
    "report": "a liger_compile.Report to collect the per-graph reports into",
    "skip_logits": "bool, default True: in training, a fused loss returns logits as a LazyTensor computed only if "
                   "read; False makes the fused op write real logits (input dtype, chunk by chunk)",
}


@dataclass
class Options:
    dump: str | None = None
    disable: tuple[str, ...] = ()
    fallback: bool = True
    inductor: bool = True
    report: Any = None
    skip_logits: bool = True
    inductor_config: dict[str, Any] = field(default_factory=dict)


def _inductor_keys() -> set[str]:
    import torch._inductor.config as config  # noqa: PLC0415

    return set(config.get_config_copy())


def parse(mode: str | None = None, options: dict | None = None) -> Options:
    from torch._inductor import list_mode_options  # noqa: PLC0415

    opts = Options(dump=os.environ.get("LIGER_COMPILE_DUMP") or None)
    if mode not in (None, "default"):
        try:
            opts.inductor_config.update(list_mode_options(mode))
        except (KeyError, RuntimeError):
            valid = ", ".join(list_mode_options())
            raise ValueError(f"liger_compile: unknown mode {mode!r}; valid modes: {valid}") from None
    options = dict(options or {})
    unknown = []
    inductor_keys = None
    for key, value in options.items():
        if key in OUR_OPTIONS:
            setattr(opts, key, tuple(value) if key == "disable" else value)
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
