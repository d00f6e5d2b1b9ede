"""Load a gin file (plus ``--gin-param`` overrides) into validated argument objects.

Before gin binds anything, every statement of the file, of its includes and of the
overrides is checked against the registered classes: an unknown class or field is
reported with its file and line and a "did you mean". Then each argument class is built
and validated (``hstu.args``); a bad value is reported with the file and line that set
it. Nothing heavy (torch process groups, models) exists yet when these errors are raised.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal

import gin
from gin import config_parser

from hstu import args as A

Task = Literal["ranking", "retrieval"]

# Classes whose instances are declared by scope: every scope bound for one of these is a table.
_TABLE_CLASSES = ("EmbeddingArgs", "DynamicEmbeddingArgs")


class _Delegate(config_parser.ParserDelegate):
    """Keeps references and macros as plain markers; only names matter for the pre-check."""

    def configurable_reference(self, scoped_configurable_name: str, evaluate: bool) -> Any:
        return ("@", scoped_configurable_name, evaluate)

    def macro(self, macro_name: str) -> Any:
        return ("%", macro_name)


@dataclass
class _Binding:
    scope: str
    cls_name: str
    field_name: str
    value: Any
    where: str


def _registered_classes() -> dict[str, Any]:
    """Short name -> configurable for every arg class (including ones added by subpackages)."""
    out: dict[str, Any] = {cls.__name__: cls for cls in A.ARG_CLASSES}
    for cls in _extra_classes():
        out[cls.__name__] = cls
    return out


def _extra_classes() -> list[type]:
    """Gin classes defined outside hstu.args (data-specific ones), if their module exists."""
    extra: list[type] = []
    try:
        from hstu.data import data_args  # noqa: PLC0415 - optional, owned by hstu.data
    except ImportError:
        return extra
    for obj in vars(data_args).values():
        if inspect.isclass(obj) and dataclasses.is_dataclass(obj) and obj.__module__ == data_args.__name__:
            extra.append(obj)
    return extra


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
    candidates = [path]
    if including_file:
        candidates.insert(0, os.path.join(os.path.dirname(including_file), path))
    for cand in candidates:
        if os.path.isfile(cand):
            return cand
    raise A.ConfigError("include", None, f"included gin file {path!r} not found").with_location(
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


def _scan(text: str, filename: str | None, label: str, seen: set[str]) -> Iterable[_Binding]:
    """Yields the bindings of one gin source, following includes."""
    try:
        statements = list(config_parser.ConfigParser(io.StringIO(text), _Delegate()))
    except SyntaxError as exc:
        where = f"{exc.filename or label}:{exc.lineno}" if exc.lineno else (exc.filename or label)
        if filename is None:  # a --gin-param string: the string itself is the location
            where = label
        raise A.ConfigError("gin", None, _syntax_message(exc.msg or str(exc), text, exc.lineno)).with_location(
            where
        ) from None
    except Exception as exc:  # tokenize errors (unclosed brackets, ...) are not SyntaxErrors
        msg = " ".join(str(exc).split())
        raise A.ConfigError("gin", None, f"cannot parse: {msg}").with_location(label) from None
    for st in statements:
        if isinstance(st, config_parser.IncludeStatement):
            inc = _resolve_include(st.filename, filename)
            real = os.path.realpath(inc)
            if real in seen:
                continue
            seen.add(real)
            with open(inc) as fh:
                yield from _scan(fh.read(), inc, inc, seen)
        elif isinstance(st, config_parser.BindingStatement):
            if filename is None:  # a --gin-param string: the string itself is the location
                where = label
            else:
                where = _location(st.location, filename)
            if not st.arg_name:  # a macro definition: NAME = value
                continue
            yield _Binding(st.scope or "", st.selector, st.arg_name, st.value, where)


def _precheck(bindings: list[_Binding]) -> None:
    """Every binding names a known class (trainer's or preprocessor's) and one of its fields."""
    classes = _registered_classes()
    for b in bindings:
        short = b.cls_name.rsplit(".", 1)[-1]
        target = classes.get(short)
        if target is None:
            raise A.ConfigError(
                b.cls_name, None, "unknown gin class" + A.did_you_mean(short, classes)
            ).with_location(b.where)
        names = _field_names(target)
        if b.field_name not in names:
            raise A.ConfigError(
                short, b.field_name, "unknown field" + A.did_you_mean(b.field_name, names)
            ).with_location(b.where)


def _parse_sources(config_files: list[str], params: list[str]) -> list[_Binding]:
    """Pre-checks, then binds (gin) the files and the --gin-param strings; returns the bindings
    with their locations. Raises a one-line ConfigError on the first problem."""
    bindings: list[_Binding] = []
    seen: set[str] = set()
    for config_file in config_files:
        if not os.path.isfile(config_file):
            raise A.ConfigError("gin", None, "config file not found").with_location(config_file)
        with open(config_file) as fh:
            text = fh.read()
        seen.add(os.path.realpath(config_file))
        bindings.extend(_scan(text, config_file, config_file, seen))
    for p in params:
        bindings.extend(_scan(p, None, f"--gin-param {p!r}", seen))
    _precheck(bindings)

    gin.clear_config()
    for d in {os.path.dirname(os.path.abspath(f)) for f in config_files}:
        gin.add_config_file_search_path(d)
    try:
        gin.parse_config_files_and_bindings(config_files, params, finalize_config=False)
    except (ValueError, SyntaxError, KeyError) as exc:
        msg = " ".join(str(exc).split("\n")[0].split())
        label = config_files[0] if config_files else "<gin-param>"
        raise A.ConfigError("gin", None, msg).with_location(label) from None
    return bindings


def load_classes(config_files: list[str], params: Iterable[str], classes: list[type]) -> dict[str, Any]:
    """Builds `classes` (e.g. the preprocessor's CustomDataArgs) from gin files and bindings,
    with the trainer's checks: unknown classes and fields with did-you-mean, bad values with
    the file and line that set them. Returns {class name: instance}."""
    params = list(params)
    try:
        bindings = _parse_sources(list(config_files), params)
        label = config_files[0] if config_files else "<gin-param>"
        return {cls.__name__: _instantiate(cls, "", bindings, label) for cls in classes}
    finally:
        gin.clear_config()  # the instances are built: no binding outlives this call


@dataclass
class RunConfig:
    """Everything one run is configured with, validated."""

    task: Task
    trainer: A.TrainerArgs
    network: A.NetworkArgs
    optimizer: A.OptimizerArgs
    tp: A.TensorModelParallelArgs
    dataset: A.DatasetArgs | A.BenchmarkDatasetArgs
    tables: list[A.EmbeddingArgs] = field(default_factory=list)
    """Tables declared in gin (by scope) or by BenchmarkDatasetArgs.embedding_args."""
    ranking: A.RankingArgs | None = None
    retrieval: A.RetrievalArgs | None = None
    sources: list[str] = field(default_factory=list)
    """The gin file and overrides this was loaded from."""
    extras: dict[str, Any] = field(default_factory=dict)
    """Instances of data-specific gin classes (hstu.data.data_args), by class name."""
    locations: dict[tuple[str, str, str], str] = field(default_factory=dict, repr=False)
    """(class, field, table name or "") -> "file:line" of the binding that set it, for errors
    found later (sizes from the data, hstu.data.sizes)."""
    warnings: list[str] = field(default_factory=list, repr=False)
    """One line each: bindings that are valid but have no effect (printed at start)."""


def _instantiate(cls: type, scope: str, bindings: list[_Binding], default_where: str) -> Any:
    """Builds cls (in gin scope) and adds the binding's file:line to a ConfigError."""
    try:
        if scope:
            with gin.config_scope(scope):
                return cls()
        return cls()
    except A.ConfigError as exc:
        where = default_where
        for b in reversed(bindings):  # the last binding of a field wins in gin
            if b.cls_name.rsplit(".", 1)[-1] == exc.cls_name and b.field_name == exc.field_name:
                if not scope or b.scope == scope:
                    where = b.where
                    break
        raise A.ConfigError(exc.cls_name, exc.field_name, exc.message).with_location(where) from None
    except Exception as exc:  # gin's own errors (e.g. a macro that is not defined)
        msg = " ".join(str(exc).split("\n")[0].split())
        raise A.ConfigError(cls.__name__, None, msg).with_location(default_where) from None


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


def unused_scope_warnings(bindings: list[_Binding]) -> list[str]:
    """One line per scoped binding that nothing reads: gin applies ``scope/Class.field`` only
    where Class is built inside that scope, which the trainer does for table declarations
    (EmbeddingArgs, DynamicEmbeddingArgs) and for references ``@scope/Class()``."""
    referenced = {name for b in bindings for name in _references(b.value)}
    out = []
    for b in bindings:
        short = b.cls_name.rsplit(".", 1)[-1]
        if not b.scope or short in _TABLE_CLASSES:
            continue
        if f"{b.scope}/{b.cls_name}" in referenced or f"{b.scope}/{short}" in referenced:
            continue
        out.append(
            f"{b.where}: {b.scope}/{short}.{b.field_name}: nothing builds {short} in scope "
            f"'{b.scope}' (only table declarations and @{b.scope}/{short}() references are "
            f"scoped); this binding is ignored (did you mean {short}.{b.field_name}?)"
        )
    return out


def _check_task(task: str, bindings: list[_Binding], label: str) -> None:
    """A ranking configuration is refused by the retrieval entry point and vice versa."""
    other, kind = ("RankingArgs", "ranking") if task == "retrieval" else ("RetrievalArgs", "retrieval")
    for b in bindings:
        if b.cls_name.rsplit(".", 1)[-1] == other:
            raise A.ConfigError(
                other, b.field_name,
                f"a {kind} setting: this is a {kind} configuration and this entry point trains "
                f"{task}; run it with pretrain_gr_{kind}.py",
            ).with_location(b.where or label)


def load_config(
    config_file: str | None,
    params: Iterable[str] = (),
    task: Task = "retrieval",
    world_size: int | None = None,
) -> RunConfig:
    """Parses, checks and builds the run's arguments. Raises ConfigError (one line).

    Args:
        config_file: path of the .gin file (None: only ``params``).
        params: gin binding strings from ``--gin-param``, applied after the file.
        task: which head's arguments to build.
        world_size: when known, also checks that TP divides it.
    """
    params = list(params)
    label = config_file or "<gin-param>"
    bindings = _parse_sources([config_file] if config_file else [], params)
    _check_task(task, bindings, label)

    def build(cls: type, scope: str = "") -> Any:
        return _instantiate(cls, scope, bindings, label)

    bound = {b.cls_name.rsplit(".", 1)[-1] for b in bindings}
    trainer = build(A.TrainerArgs)
    network = build(A.NetworkArgs)
    optimizer = build(A.OptimizerArgs)
    tp = build(A.TensorModelParallelArgs)
    if "BenchmarkDatasetArgs" in bound:
        dataset: Any = build(A.BenchmarkDatasetArgs)
        tables = list(dataset.embedding_args)
    else:
        dataset = build(A.DatasetArgs)
        tables = []
    # Tables declared by scope in the file (e.g. item/DynamicEmbeddingArgs.table_name = ...)
    table_scopes: list[tuple[str, str]] = []
    for b in bindings:
        short = b.cls_name.rsplit(".", 1)[-1]
        if short in _TABLE_CLASSES and (b.scope, short) not in table_scopes:
            table_scopes.append((b.scope, short))
    referenced = {id(t) for t in tables}
    locations: dict[tuple[str, str, str], str] = {}
    for b in bindings:
        short = b.cls_name.rsplit(".", 1)[-1]
        if short not in _TABLE_CLASSES:
            locations[(short, b.field_name, "")] = b.where
    for scope, short in table_scopes:
        table = build(getattr(A, short), scope)
        for b in bindings:
            if b.scope == scope and b.cls_name.rsplit(".", 1)[-1] == short:
                locations[(short, b.field_name, table.table_name)] = b.where
        if id(table) not in referenced:
            tables.append(table)
    if isinstance(dataset, A.BenchmarkDatasetArgs):
        # scoped declarations may repeat the referenced ones; keep one per name+class
        unique: dict[tuple[str, str], A.EmbeddingArgs] = {}
        for t in tables:
            unique.setdefault((t.table_name, type(t).__name__), t)
        tables = list(unique.values())
    try:
        A.check_tables(tables)
        A.check_parallel(network, tp, world_size)
    except A.ConfigError as exc:
        where = next(
            (b.where for b in reversed(bindings)
             if (b.cls_name.rsplit(".", 1)[-1], b.field_name) == (exc.cls_name, exc.field_name)),
            label,
        )
        raise exc.with_location(where) from None
    try:
        A.check_batch_tokens(trainer, dataset, task)
    except A.ConfigError as exc:
        where = next(
            (b.where for b in reversed(bindings) if b.field_name == exc.field_name), label
        )
        raise exc.with_location(where) from None

    if network.architecture == "mlp_baseline" and task != "ranking":
        where = next((b.where for b in reversed(bindings) if b.field_name == "architecture"), label)
        raise A.ConfigError(
            "NetworkArgs", "architecture", "mlp_baseline is a ranking baseline; retrieval needs hstu"
        ).with_location(where)
    ranking = build(A.RankingArgs) if task == "ranking" else None
    retrieval = build(A.RetrievalArgs) if task == "retrieval" else None
    if ranking is not None and ranking.history_loss_weight > 0:
        where = next(
            (b.where for b in reversed(bindings) if b.field_name == "history_loss_weight"), label
        )
        if getattr(dataset, "action_tokens", True) is False:
            raise A.ConfigError(
                "RankingArgs", "history_loss_weight",
                "needs the history's actions as tokens (DatasetArgs.action_tokens = True)",
            ).with_location(where)
        if network.architecture == "mlp_baseline":
            raise A.ConfigError(
                "RankingArgs", "history_loss_weight",
                "the mlp_baseline has no history tokens to supervise; set it to 0",
            ).with_location(where)
    if not network.is_causal and (retrieval is not None or ranking.history_loss_weight > 0):
        where = next(
            (
                b.where
                for b in reversed(bindings)
                if b.cls_name.rsplit(".", 1)[-1] == "NetworkArgs" and b.field_name == "is_causal"
            ),
            label,
        )
        if retrieval is not None:
            why = (
                "retrieval trains next-item prediction from every history position, and "
                "non-causal attention lets each position see the item it predicts; set it to True"
            )
        else:
            why = (
                "RankingArgs.history_loss_weight > 0 supervises each history item on its own "
                "action, and non-causal attention lets the item's token see that action token; "
                "set it to True or history_loss_weight to 0"
            )
        raise A.ConfigError("NetworkArgs", "is_causal", why).with_location(where)
    if ranking is not None:
        metrics = tuple(ranking.eval_metrics) + tuple(
            f"AUC/task{i}" for i in range(ranking.num_tasks) if ranking.num_tasks > 1
        )
    else:
        metrics = tuple(retrieval.eval_metrics)
    try:
        A.check_selection(trainer, dataset, metrics)
    except A.ConfigError as exc:
        where = next(
            (b.where for b in reversed(bindings) if b.field_name == "best_metric"), label
        )
        raise exc.with_location(where) from None
    extras = {cls.__name__: build(cls) for cls in _extra_classes() if cls.__name__ in bound}
    sources = ([config_file] if config_file else []) + [f"--gin-param {p}" for p in params]
    return RunConfig(
        task=task,
        trainer=trainer,
        network=network,
        optimizer=optimizer,
        tp=tp,
        dataset=dataset,
        tables=tables,
        ranking=ranking,
        retrieval=retrieval,
        sources=sources,
        extras=extras,
        locations=locations,
        warnings=unused_scope_warnings(bindings),
    )


__all__ = ["RunConfig", "load_classes", "load_config"]
