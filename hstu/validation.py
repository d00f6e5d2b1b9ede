"""The validation framework of hstu's gin dataclasses: required fields, type checks, ranges,
one-line errors, did-you-mean, and the field docstrings read back for the documentation.

Every ``@gin.configurable`` dataclass of hstu (``hstu.args`` for the trainer,
``hstu.data.data_args`` for the preprocessor) calls :func:`_validate_fields` and the small
checks below from ``__post_init__``; a problem raises :class:`ConfigError`, one line naming
the class and the field (``hstu.config`` adds the gin file and line). Knows nothing of
torch, gin or the classes themselves.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import itertools
import textwrap
import types
import typing
from functools import cache
from typing import Any, Literal

AUTO = "auto"
"""Value of a size field resolved from the preprocessed data before any process starts."""


class _Required:
    """Sentinel for a field that the gin file must set."""

    def __repr__(self) -> str:
        return "REQUIRED"

    def __deepcopy__(self, memo: dict) -> _Required:
        return self

    def __copy__(self) -> _Required:
        return self


REQUIRED: Any = _Required()


class ConfigError(ValueError):
    """A bad configuration value. Single line, names class and field."""

    def __init__(self, cls_name: str, field_name: str | None, message: str) -> None:
        self.cls_name = cls_name
        self.field_name = field_name
        self.message = message
        self.location: str | None = None
        super().__init__(self._render())

    def _render(self) -> str:
        where = f"{self.location}: " if self.location else ""
        what = f"{self.cls_name}.{self.field_name}" if self.field_name else self.cls_name
        return f"{where}{what}: {self.message}"

    def with_location(self, location: str) -> ConfigError:
        self.location = location
        self.args = (self._render(),)
        return self


# ------------------------------------------------------------------------------ checks


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        inner = _type_name(args[0]) if args else "Any"
        return f"{origin.__name__}[{inner}]"
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", str(tp))


def _check_type(value: Any, tp: Any) -> tuple[bool, Any]:
    """Returns (ok, converted value). Converts int -> float and list <-> tuple only."""
    if tp is Any:
        return True, value
    origin = typing.get_origin(tp)
    if origin is Literal:
        return value in typing.get_args(tp), value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, conv = _check_type(value, arg)
            if ok:
                return True, conv
        return False, value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False, value
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        inner = args[0] if args else Any
        out = []
        for item in value:
            ok, conv = _check_type(item, inner)
            if not ok:
                return False, value
            out.append(conv)
        return True, origin(out)
    if tp is type(None):
        return value is None, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if tp is str:
        return isinstance(value, str), value
    if inspect.isclass(tp):
        return isinstance(value, tp), value
    return True, value


def _validate_fields(obj: Any) -> None:
    """Type-checks every field of a dataclass instance and fills in converted values."""
    cls = type(obj)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if value is REQUIRED:
            raise ConfigError(cls.__name__, f.name, "required field is not set")
        tp = hints[f.name]
        ok, conv = _check_type(value, tp)
        if not ok:
            if typing.get_origin(tp) is Literal or (
                typing.get_origin(tp) in (typing.Union, types.UnionType)
                and any(typing.get_origin(a) is Literal for a in typing.get_args(tp))
            ):
                raise ConfigError(
                    cls.__name__, f.name, f"{value!r} is not one of {_type_name(tp)}"
                )
            raise ConfigError(
                cls.__name__,
                f.name,
                f"expected {_type_name(tp)}, got {type(value).__name__} {value!r}",
            )
        object.__setattr__(obj, f.name, conv)


def _require(cond: bool, obj: Any, field_name: str | None, message: str) -> None:
    if not cond:
        raise ConfigError(type(obj).__name__, field_name, message)


def _positive(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is not None:
            _require(value > 0, obj, name, f"must be > 0, got {value!r}")


def _non_negative(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is not None:
            _require(value >= 0, obj, name, f"must be >= 0, got {value!r}")


def did_you_mean(name: str, candidates: typing.Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest candidate, or ''."""
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (inherited ones included)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        # gin wraps __init__ but leaves the class body; read it from source.
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        tree = ast.parse(source)
        cls_node = next(n for n in tree.body if isinstance(n, ast.ClassDef))
        body = cls_node.body
        for node, nxt in itertools.pairwise(body):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def field_specs(cls: type) -> list[tuple[str, str, str, str]]:
    """(name, type, default, doc) for each field, in declaration order."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = "required" if f.default is REQUIRED else repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:  # pragma: no cover - unused today
            default = repr(f.default_factory())
        else:
            default = "required"
        rows.append((f.name, _type_name(hints[f.name]), default, docs.get(f.name, "")))
    return rows


__all__ = [
    "AUTO",
    "REQUIRED",
    "ConfigError",
    "did_you_mean",
    "field_docs",
    "field_specs",
]
