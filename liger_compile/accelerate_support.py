"""Teach accelerate the backend name, so `TrainingArguments(torch_compile_backend="liger")` reaches us.

The HF Trainer hands `torch_compile_backend` to accelerate's `TorchDynamoPlugin`, which converts it to its
`DynamoBackend` enum; that enum lists only torch's built-in backends, so "liger" is rejected with
`ValueError: 'LIGER' is not a valid DynamoBackend` before anything is compiled. accelerate later calls
`torch.compile(model, backend=plugin.backend.value.lower(), mode=...)`, which finds our registered name.

We add one member, LIGER, to that enum when `liger_compile` is imported. Python enums have no public way to
add a member, so this writes the same internal tables `enum` itself fills (`_member_map_`, `_value2member_map_`,
`_member_names_`); it is checked afterwards and, if this accelerate's enum is built differently, skipped with a
warning that names the fallback (compile the model yourself and leave the Trainer's torch_compile off).
"""
from __future__ import annotations

import logging

log = logging.getLogger("liger_compile")

MEMBER = "LIGER"
FALLBACK_HINT = (
    "compile the model yourself before giving it to the Trainer: "
    "`model = torch.compile(model, backend='liger')`, and leave torch_compile/torch_compile_backend unset"
)


def _add_member(enum_cls, name: str, value: str) -> None:
    member = str.__new__(enum_cls, value)  # DynamoBackend mixes in str
    member._name_ = name
    member._value_ = value
    member.__objclass__ = enum_cls
    member.__init__(value)
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[value] = member
    enum_cls._member_names_.append(name)
    type.__setattr__(enum_cls, name, member)


def register_with_accelerate() -> bool:
    """Adds DynamoBackend.LIGER if accelerate is installed and lacks it. Returns whether the name is accepted."""
    try:
        from accelerate.utils.dataclasses import DynamoBackend  # noqa: PLC0415
    except Exception:  # accelerate not installed, or moved: nothing to teach
        return False
    if MEMBER in DynamoBackend.__members__:
        return True
    try:
        _add_member(DynamoBackend, MEMBER, MEMBER)
        ok = DynamoBackend(MEMBER) is DynamoBackend[MEMBER] and DynamoBackend[MEMBER].value.lower() == "liger"
    except Exception as e:  # an accelerate whose enum is built differently
        ok = False
        log.debug("liger_compile: could not extend accelerate's DynamoBackend: %s", e)
    if not ok:
        log.warning("liger_compile: this accelerate version does not accept torch_compile_backend='liger'; %s",
                    FALLBACK_HINT)
    return ok
