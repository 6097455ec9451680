"""The method registry: every steering method by name, its typed config, and one way to build it.

Adding a method = one file with a `SteeringMethod` subclass (and its `MethodConfig` subclass) plus
one line in `BUILTIN` below ("module:Class"). Pages, runs, checkpoints and benchmarks find methods
only through this registry, so nothing else has to change.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from toast_core.core.backbone import Backbone
from toast_core.methods.base import MethodConfig, MethodOutput, SteeringMethod

#: one line per method: "module:Class" (the class's `name` is its registry key)
BUILTIN: tuple[str, ...] = (
    "toast_core.methods.linear:LinearProbe",
    "toast_core.methods.full:FullFineTune",
    "toast_core.methods.bitfit:BitFit",
    "toast_core.methods.lora:LoRA",
    "toast_core.methods.vpt:VPT",
    "toast_core.methods.visual_prompt:VisualPrompt",
    "toast_core.methods.toast:Toast",
    "toast_core.methods.toast:ToastLite",
    "toast_core.methods.fort:FortFullFineTune",
    "toast_core.methods.fort:FortLoRA",
    "toast_core.methods.fort:FortBitFit",
    "toast_core.methods.attention_transfer:AttentionCopy",
    "toast_core.methods.attention_transfer:AttentionDistill",
    "toast_core.methods.attention_transfer:StudentMethod",
)

REGISTRY: dict[str, type[SteeringMethod]] = {}


class UnknownMethod(KeyError):
    """A method name that is not in the registry."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else "unknown method"


def register(cls: type[SteeringMethod]) -> type[SteeringMethod]:
    """Add a method class under its `name` (usable as a decorator); refuses a clash with another class."""
    if not (isinstance(cls, type) and issubclass(cls, SteeringMethod)):
        raise TypeError(f"{cls!r} is not a SteeringMethod subclass.")
    if not (isinstance(cls.config_cls, type) and issubclass(cls.config_cls, MethodConfig)):
        raise TypeError(f"{cls.__name__}.config_cls must be a MethodConfig subclass.")
    existing = REGISTRY.get(cls.name)
    if existing is not None and existing is not cls:
        raise ValueError(f"Method name '{cls.name}' is already taken by {existing.__name__}.")
    REGISTRY[cls.name] = cls
    return cls


def _load(spec: str) -> type[SteeringMethod]:
    module_name, _, class_name = spec.partition(":")
    return getattr(importlib.import_module(module_name), class_name)


for _spec in BUILTIN:
    register(_load(_spec))


def method_names() -> list[str]:
    """Registered method names, in registration order."""
    return list(REGISTRY)


def method_class(name: str) -> type[SteeringMethod]:
    try:
        return REGISTRY[name]
    except KeyError:
        raise UnknownMethod(
            f"Unknown steering method '{name}'. Known methods: {', '.join(method_names())}."
        ) from None


def _coerce(value: Any, field: dataclasses.Field) -> Any:
    """JSON turns tuples into lists; give tuple-typed fields their tuples back."""
    if isinstance(value, list) and "tuple" in str(field.type):
        return tuple(value)
    return value


def config_for(name: str, **kwargs: Any) -> MethodConfig:
    """The method's typed config from keyword values; unknown keys are refused, naming the valid ones."""
    cls = method_class(name).config_cls
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in kwargs if k not in fields)
    if unknown:
        raise ValueError(
            f"Unknown setting(s) for method '{name}': {', '.join(unknown)}. "
            f"Valid settings: {', '.join(fields)}."
        )
    values = {k: _coerce(v, fields[k]) for k, v in kwargs.items()}
    return cls(**values)


def build_method(
    name: str,
    backbone: Backbone,
    num_classes: int,
    config: MethodConfig | dict[str, Any] | None = None,
) -> SteeringMethod:
    """Build a fresh method for `backbone`; `config` may be the typed config, a plain dict or None."""
    cls = method_class(name)
    if config is None:
        cfg = cls.config_cls()
    elif isinstance(config, dict):
        cfg = config_for(name, **config)
    elif isinstance(config, cls.config_cls):
        cfg = config
    else:
        raise TypeError(
            f"Method '{name}' takes a {cls.config_cls.__name__} (or a dict), got {type(config).__name__}."
        )
    return cls(backbone, num_classes, cfg)


__all__ = [
    "BUILTIN",
    "REGISTRY",
    "MethodConfig",
    "MethodOutput",
    "SteeringMethod",
    "UnknownMethod",
    "build_method",
    "config_for",
    "method_class",
    "method_names",
    "register",
]
