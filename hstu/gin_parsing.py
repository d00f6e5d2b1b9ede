"""Reading gin sources with one-line errors: the binding scanner, the pre-check of class and
field names with a "did you mean", and the file:line of every binding.

Before gin binds anything, every statement of the files, of their includes and of the
``--gin-param`` overrides is checked against the classes the caller registers: an unknown
class or field is reported with its file and line. Each class is then built in its gin
scope, and a :class:`~hstu.validation.ConfigError` it raises gets the file and line of the
binding that set the field.

This module knows nothing of the trainer's classes, the data or torch: the run-config
assembly (:mod:`hstu.config`) and the preprocessor (:mod:`hstu.data.preprocess`) pass the
classes they know. It sits below both (docs/architecture.md, "Layers").
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import io
import os
import re
import tokenize
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import gin
from gin import config_parser

from hstu.validation import ConfigError, did_you_mean


class _Delegate(config_parser.ParserDelegate):
    """Keeps references and macros as plain markers; only names matter for the pre-check."""

    def configurable_reference(self, scoped_configurable_name: str, evaluate: bool) -> Any:
        return ("@", scoped_configurable_name, evaluate)

    def macro(self, macro_name: str) -> Any:
        return ("%", macro_name)


@dataclass
class Binding:
    """One ``scope/Class.field = value`` statement and where it was written."""

    scope: str
    cls_name: str
    field_name: str
    value: Any
    where: str
    """``file:line``, or ``--gin-param '...'`` for an override."""

    @property
    def short_name(self) -> str:
        """The class name without its module (``hstu.args.TrainerArgs`` -> ``TrainerArgs``)."""
        return self.cls_name.rsplit(".", 1)[-1]


def _field_names(target: Any) -> list[str]:
    if dataclasses.is_dataclass(target):
        return [f.name for f in dataclasses.fields(target)]
    return list(inspect.signature(target).parameters)


def _location(loc: config_parser.Location | None, fallback: str) -> str:
    if loc is None:
        return fallback
    name = loc.filename or fallback
    return f"{name}:{loc.line_num}" if loc.line_num is not None else name


def _resolve_include(path: str, including_file: str | None) -> str:
    # beside the including file first, then as given
    for cand in (os.path.join(os.path.dirname(including_file or ""), path), path):
        if os.path.isfile(cand):
            return cand
    raise ConfigError("include", None, f"included gin file {path!r} not found").with_location(
        including_file or "<gin-param>"
    )


_BAD_TOKEN = re.compile(r"Failed to parse token '(?P<tok>[^']*)'")


def _syntax_message(msg: str, text: str, lineno: int | None) -> str:
    """gin's syntax error in one line; a bare word where a value belongs (a string without
    its quotes, the usual slip on a command line) gets the quoted form to copy."""
    match = _BAD_TOKEN.search(msg)
    if match is None:
        return "syntax error: " + " ".join(msg.split())
    tok = match.group("tok")
    line = ""
    lines = text.splitlines()
    if lineno is not None and 0 < lineno <= len(lines):
        line = lines[lineno - 1]
    lhs = line.split("=", 1)[0].strip() if "=" in line else "Class.field"
    return (
        f"value {tok} is not a gin literal (a number, True/False/None, a \"quoted string\", "
        f"[list] or (tuple)); a string needs its quotes: {lhs}=\"{tok}\""
    )


def _scan(text: str, filename: str | None, label: str, seen: set[str]) -> Iterable[Binding]:
    """Yields the bindings of one gin source, following includes."""
    try:
        statements = list(config_parser.ConfigParser(io.StringIO(text), _Delegate()))
    except SyntaxError as exc:
        where = f"{exc.filename or label}:{exc.lineno}" if exc.lineno else (exc.filename or label)
        if filename is None:  # a --gin-param string: the string itself is the location
            where = label
        message = _syntax_message(exc.msg or str(exc), text, exc.lineno)
        raise ConfigError("gin", None, message).with_location(where) from None
    except (tokenize.TokenError, ValueError) as exc:  # unclosed brackets, ...: not SyntaxErrors
        msg = " ".join(str(exc).split())
        raise ConfigError("gin", None, f"cannot parse: {msg}").with_location(label) from None
    for st in statements:
        if isinstance(st, config_parser.IncludeStatement):
            inc = _resolve_include(st.filename, filename)
            real = os.path.realpath(inc)
            if real in seen:
                continue
            seen.add(real)
            with open(inc) as fh:
                yield from _scan(fh.read(), inc, inc, seen)
        elif isinstance(st, config_parser.BindingStatement) and st.arg_name:  # not a macro
            where = label if filename is None else _location(st.location, filename)
            yield Binding(st.scope or "", st.selector, st.arg_name, st.value, where)


def read_bindings(path: str) -> list[Binding]:
    """The bindings of one gin file (its includes followed), without gin's registry: a run's
    operative_config.gin read by a tool. Raises ConfigError (one line, file:line)."""
    with open(path) as fh:
        return list(_scan(fh.read(), path, path, {os.path.realpath(path)}))


def _precheck(bindings: list[Binding], known: dict[str, Any]) -> None:
    """Every binding names a known class and one of its fields."""
    for b in bindings:
        short = b.short_name
        target = known.get(short)
        if target is None:
            raise ConfigError(
                b.cls_name, None, "unknown gin class" + did_you_mean(short, known)
            ).with_location(b.where)
        names = _field_names(target)
        if b.field_name not in names:
            # a field of a subclass only (e.g. DynamicEmbeddingArgs' on an EmbeddingArgs)
            owners = sorted(
                name for name, cls in known.items()
                if isinstance(cls, type) and isinstance(target, type) and cls is not target
                and issubclass(cls, target) and b.field_name in _field_names(cls)
            )
            hint = (f" (a field of {' and '.join(owners)} only)" if owners
                    else did_you_mean(b.field_name, names))
            raise ConfigError(short, b.field_name, "unknown field" + hint).with_location(b.where)


def parse_sources(
    config_files: list[str], params: list[str], known: Iterable[type]
) -> list[Binding]:
    """Pre-checks against ``known`` (every class a binding may name), then binds (gin) the
    files and the ``--gin-param`` strings; returns the bindings with their locations. Raises
    a one-line ConfigError on the first problem."""
    classes = {cls.__name__: cls for cls in known}
    bindings: list[Binding] = []
    seen: set[str] = set()
    for config_file in config_files:
        if not os.path.isfile(config_file):
            raise ConfigError("gin", None, "config file not found").with_location(config_file)
        with open(config_file) as fh:
            text = fh.read()
        seen.add(os.path.realpath(config_file))
        bindings.extend(_scan(text, config_file, config_file, seen))
    for p in params:
        bindings.extend(_scan(p, None, f"--gin-param {p!r}", seen))
    _precheck(bindings, classes)

    gin.clear_config()
    for d in {os.path.dirname(os.path.abspath(f)) for f in config_files}:
        gin.add_config_file_search_path(d)
    try:
        gin.parse_config_files_and_bindings(config_files, params, finalize_config=False)
    except (ValueError, SyntaxError, KeyError) as exc:
        msg = " ".join(str(exc).split("\n")[0].split())
        label = config_files[0] if config_files else "<gin-param>"
        raise ConfigError("gin", None, msg).with_location(label) from None
    return bindings


@contextmanager
def unrecorded() -> Iterator[None]:
    """Configurable calls inside are left out of gin's operative config. gin records the
    parameters of every call of a configurable class, and a run writes that config into its
    directory and checkpoints (an export reads it back): code that builds an unscoped
    EmbeddingArgs itself (the dataset's default tables) must not add an unscoped
    ``EmbeddingArgs`` section to it, which would read back as a table of its own (gin 0.5 keeps
    the record in ``_OPERATIVE_CONFIG``)."""
    recorded = copy.deepcopy(gin.config._OPERATIVE_CONFIG)
    try:
        yield
    finally:
        gin.config._OPERATIVE_CONFIG.clear()
        gin.config._OPERATIVE_CONFIG.update(recorded)


def instantiate(cls: type, scope: str, bindings: list[Binding], default_where: str) -> Any:
    """Builds cls (in gin scope) and adds the binding's file:line to a ConfigError."""
    try:
        if scope:
            with gin.config_scope(scope):
                return cls()
        return cls()
    except ConfigError as exc:
        where = default_where
        for b in reversed(bindings):  # the last binding of a field wins in gin
            same_field = b.short_name == exc.cls_name and b.field_name == exc.field_name
            if same_field and (not scope or b.scope == scope):
                where = b.where
                break
        raise ConfigError(exc.cls_name, exc.field_name, exc.message).with_location(where) from None
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        # gin's own errors (a macro that is not defined is a TypeError, an unknown reference
        # a ValueError)
        msg = " ".join(str(exc).split("\n")[0].split())
        raise ConfigError(cls.__name__, None, msg).with_location(default_where) from None


def where_set(
    bindings: list[Binding], field_name: str, default: str, cls_name: str | None = None
) -> str:
    """file:line of the last binding of ``field_name`` (of class ``cls_name`` when given), the
    one gin applies; ``default`` when none sets it."""
    for b in reversed(bindings):
        if b.field_name == field_name and (cls_name is None or b.short_name == cls_name):
            return b.where
    return default


def _references(value: Any) -> Iterable[str]:
    """The ``scope/Class`` names a binding's value refers to (``@scope/Class()``)."""
    if isinstance(value, tuple) and len(value) == 3 and value[0] == "@":
        yield str(value[1])
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _references(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _references(v)


def unused_scope_warnings(bindings: list[Binding], scoped_classes: Iterable[str]) -> list[str]:
    """One line per scoped binding that nothing reads: gin applies ``scope/Class.field`` only
    where Class is built inside that scope, which the caller does for ``scoped_classes``
    (declarations by scope, e.g. the trainer's tables) and gin for references
    ``@scope/Class()``."""
    scoped = set(scoped_classes)
    referenced = {name for b in bindings for name in _references(b.value)}
    out = []
    for b in bindings:
        short = b.short_name
        if not b.scope or short in scoped:
            continue
        if f"{b.scope}/{b.cls_name}" in referenced or f"{b.scope}/{short}" in referenced:
            continue
        out.append(
            f"{b.where}: {b.scope}/{short}.{b.field_name}: nothing builds {short} in scope "
            f"'{b.scope}' (only table declarations and @{b.scope}/{short}() references are "
            f"scoped); this binding is ignored (did you mean {short}.{b.field_name}?)"
        )
    return out


def load_classes(
    config_files: list[str], params: Iterable[str], classes: list[type], known: Iterable[type]
) -> dict[str, Any]:
    """Builds ``classes`` (e.g. the preprocessor's CustomDataArgs) from gin files and bindings
    that may name any of ``known``: unknown classes and fields with did-you-mean, bad values
    with the file and line that set them. Returns {class name: instance}."""
    params = list(params)
    try:
        bindings = parse_sources(list(config_files), params, known)
        label = config_files[0] if config_files else "<gin-param>"
        return {cls.__name__: instantiate(cls, "", bindings, label) for cls in classes}
    finally:
        gin.clear_config()  # the instances are built: no binding outlives this call


__all__ = [
    "Binding",
    "instantiate",
    "load_classes",
    "parse_sources",
    "unused_scope_warnings",
    "where_set",
]
