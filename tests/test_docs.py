"""The pages a user reads (docs/*.md and README.md) against the repository they describe.

- Every command in a code block (fenced, or indented by 4 spaces) that names a preset
  (``configs/*.gin``), a module (``python -m x.y``) or a script (``scripts/...``, a ``*.py`` at
  the root) names one that exists; an entry-point command (``pretrain_gr_*.py
  --gin-config-file configs/x.gin [--gin-param ...]``) validates as ``--check-config`` validates
  a configuration before it reads any data (gin names, types, choices, the world size of its
  ``--nproc_per_node``), with its own ``--gin-param`` bindings.
- Every ``configs/*.gin`` named anywhere on a page exists.
- Internal links resolve: relative ``[text](page.md#anchor)`` links to an existing file and
  heading, and the project's textual references (``docs/x.md "Section"``, also in the code,
  scripts, presets and tests) to an existing page and a heading that starts with the section.
- No page narrates the work's history (issue and session numbers, rounds of work, "this
  branch", who measured beside what): how a figure was reached belongs to git log.

Runs in a few seconds (the presets are validated in this process, without data).
"""

from __future__ import annotations

import importlib.util
import re
import shlex
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
# Where textual references to docs sections live besides the pages themselves.
REFERRING = ["hstu", "scripts", "configs", "tests"]

# ---------------------------------------------------------------------------------------------
# Reading pages


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def code_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every line inside a code block: fenced (``` or ~~~) or indented
    by 4 spaces after a blank line (outside a list item's continuation)."""
    out: list[tuple[int, str]] = []
    fence: str | None = None
    indented = False
    prev_blank = True
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if fence is not None:
            if stripped.startswith(fence):
                fence = None
            else:
                out.append((number, line))
            prev_blank = False
            continue
        if stripped.startswith(("```", "~~~")):
            fence = stripped[:3]
            indented = False
            prev_blank = False
            continue
        if line.startswith("    ") and stripped and (indented or prev_blank):
            indented = True
            out.append((number, line[4:]))
        elif stripped:
            indented = False
        prev_blank = not stripped
    return out


_COMMAND_START = re.compile(
    r"^(?:[A-Z_][A-Z0-9_]*=\S*\s+)*"  # environment assignments
    r"(?:/usr/bin/time(?: -v)?\s+|nice(?: -n \d+)?\s+|taskset -c \S+\s+)*"
    r"(?:\S*/)?(?:python3?|torchrun|bash|make|pytest|ruff)\b"
)


def commands(text: str) -> list[tuple[int, str]]:
    """(line number, command) of every shell command in a page's code blocks; lines ending in a
    backslash are joined, trailing ``# comments`` dropped."""
    out: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for number, line in code_lines(text):
        body = re.sub(r"\s+#\s.*$", "", line).rstrip()
        if pending is not None:
            start, head = pending
            joined = head + " " + body.strip().rstrip("\\").strip()
            pending = (start, joined) if body.endswith("\\") else None
            if pending is None:
                out.append((start, joined))
            continue
        body = re.sub(r"^(\s*)\$ ", r"\1", body)
        if not _COMMAND_START.match(body.strip()):
            continue
        if body.endswith("\\"):
            pending = (number, body.rstrip("\\").strip())
        else:
            out.append((number, body.strip()))
    if pending is not None:
        out.append(pending)
    return out


def split(command: str) -> list[str]:
    try:
        return shlex.split(command)
    except ValueError:  # an unbalanced quote in an example: the plain words
        return command.split()


# ---------------------------------------------------------------------------------------------
# What a command names


def module_exists(name: str) -> bool:
    if name.split(".")[0] == "hstu":
        base = ROOT.joinpath(*name.split("."))
        if base.with_suffix(".py").is_file():
            return "__main__" in base.with_suffix(".py").read_text()
        return (base / "__main__.py").is_file()
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


_PLACEHOLDER = re.compile(r"<[^>]*>|\.\.\.|\bPATH\b|^[A-Z][A-Z0-9_]*$")


def named_targets(argv: list[str]) -> list[tuple[str, str]]:
    """(kind, name) of every module, script and preset a command names."""
    out: list[tuple[str, str]] = []
    for i, arg in enumerate(argv):
        if arg == "-m" and i > 0 and re.search(r"python3?$", argv[i - 1]) and i + 1 < len(argv):
            out.append(("module", argv[i + 1]))
        elif re.fullmatch(r"(\./)?scripts/[\w./-]+", arg):
            out.append(("script", arg.removeprefix("./")))
        elif re.fullmatch(r"[\w-]+\.py", arg):
            out.append(("script", arg))
        elif re.fullmatch(r"configs/[\w./-]+\.gin", arg):
            out.append(("preset", arg))
    return out


def entry_run(argv: list[str]) -> tuple[str, str, list[str], int] | None:
    """(task, preset, bindings, world size) of an entry-point command, or None."""
    entry = next((a for a in argv if re.fullmatch(r"pretrain_gr_(ranking|retrieval)\.py", a)),
                 None)
    if entry is None or "--gin-config-file" not in argv:
        return None
    preset = argv[argv.index("--gin-config-file") + 1]
    if not preset.startswith("configs/") or _PLACEHOLDER.search(preset):
        return None
    task = "ranking" if "ranking" in entry else "retrieval"
    bindings = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--gin-param"]
    world = 1
    if "--nproc_per_node" in argv:
        nproc = argv[argv.index("--nproc_per_node") + 1]
        world = int(nproc) if nproc.isdigit() else 1
        if "--nnodes" in argv and argv[argv.index("--nnodes") + 1].isdigit():
            world *= int(argv[argv.index("--nnodes") + 1])
    if "--world-size" in argv:
        world = int(argv[argv.index("--world-size") + 1])
    return task, preset, bindings, world


def page_commands() -> list[tuple[str, int, str]]:
    return [(rel(page), number, command) for page in PAGES
            for number, command in commands(page.read_text())]


def shown_errors() -> dict[tuple[str, int], str]:
    """(page, line of a command) -> the ``error: ...`` line the page shows right after it: an
    example of a refused command, which must be refused with that message."""
    out = {}
    for page in PAGES:
        text = page.read_text()
        lines = dict(code_lines(text))
        for number, command in commands(text):
            after = number + 1 + command.count("\\")
            if lines.get(after, "").startswith("error: "):
                out[(rel(page), number)] = lines[after].removeprefix("error: ").strip()
    return out


def test_the_pages_hold_commands() -> None:
    """The parser finds the commands (a parser that found none would pass everything)."""
    found = page_commands()
    assert len(found) > 50, found
    assert any("pretrain_gr_ranking.py" in c for _, _, c in found)
    assert any("-m hstu.bench" in c for _, _, c in found)


def test_commands_name_what_exists() -> None:
    missing = []
    for page, number, command in page_commands():
        for kind, name in named_targets(split(command)):
            if _PLACEHOLDER.search(name):
                continue
            ok = module_exists(name) if kind == "module" else (ROOT / name).is_file()
            if not ok:
                missing.append(f"{page}:{number}: no {kind} {name!r}: {command}")
    assert not missing, "\n".join(missing)


def _module_file(name: str) -> Path:
    base = ROOT.joinpath(*name.split("."))
    return base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__main__.py"


def program_file(argv: list[str]) -> tuple[Path, list[str]] | None:
    """(source file, its arguments) of the project's own program a command runs: a script or
    an ``hstu`` module. The entry points' options live in ``hstu/cli.py``; a command that
    runs an entry point through a launcher (``python -m hstu.launch ... pretrain_gr_x.py``)
    is checked from the entry point on (the launcher's own options are torchrun's)."""
    for i, arg in enumerate(argv):
        if re.fullmatch(r"pretrain_gr_(ranking|retrieval)\.py", arg):
            return ROOT / "hstu" / "cli.py", argv[i + 1:]
    for i, arg in enumerate(argv):
        if arg == "-m" and i + 1 < len(argv) and argv[i + 1].split(".")[0] == "hstu":
            return _module_file(argv[i + 1]), argv[i + 2:]
        if re.fullmatch(r"(\./)?scripts/[\w./-]+\.(py|sh)|[\w-]+\.py", arg):
            return ROOT / arg.removeprefix("./"), argv[i + 1:]
    return None


def options_source(path: Path) -> str:
    """The text that declares a program's options: its own, or that of the ``hstu`` module
    whose ``main`` a thin script calls."""
    source = path.read_text()
    if "add_argument" not in source:
        m = re.search(r"from (hstu[\w.]*) import main", source)
        if m:
            return _module_file(m.group(1)).read_text()
    return source


def test_commands_use_options_their_program_has() -> None:
    """Every ``--option`` given to one of the project's programs is one it declares."""
    unknown = []
    for page, number, command in page_commands():
        found = program_file(split(command))
        if found is None or not found[0].is_file():
            continue
        path, args = found
        source = options_source(path)
        for arg in args:
            option = arg.split("=", 1)[0]
            if re.fullmatch(r"--[a-z][\w-]*", option) and f'"{option}"' not in source \
                    and f"'{option}'" not in source and f"{option})" not in source:
                unknown.append(f"{page}:{number}: {rel(path)} has no option {option}: {command}")
    assert not unknown, "\n".join(unknown)


def test_every_preset_named_on_a_page_exists() -> None:
    missing = [f"{rel(page)}:{text[:m.start()].count(chr(10)) + 1}: {m.group(0)}"
               for page in PAGES for text in [page.read_text()]
               for m in re.finditer(r"configs/[\w./-]*?\.gin\b", text)
               if not (ROOT / m.group(0)).is_file()]
    assert not missing, "\n".join(missing)


@cache
def _check(task: str, preset: str, bindings: tuple[str, ...], world: int) -> str | None:
    import gin

    from hstu.args import ConfigError
    from hstu.config import load_config

    def load(params: list[str]) -> str | None:
        gin.clear_config()
        try:
            load_config(str(ROOT / preset), params, task=task, world_size=world)
        except ConfigError as exc:
            return str(exc)
        finally:
            gin.clear_config()
        return None

    error = load(list(bindings))
    own = [b for b in bindings if b.startswith("DatasetArgs.dataset_name=")]
    if error is not None and "dataset_name" in error and own:
        # the name of the reader's own preprocessed data, which this host does not hold
        error = load([b for b in bindings if b not in own])
    return error


@pytest.mark.usefixtures("plain_process")
def test_entry_point_commands_pass_the_config_check() -> None:
    """What --check-config checks before it reads the data: class and field names, types,
    choices, required fields, the task, and tensor parallelism against the process count."""
    failures = []
    checked = 0
    refused = shown_errors()
    for page, number, command in page_commands():
        run = entry_run(split(command))
        if run is None:
            continue
        task, preset, bindings, world = run
        bindings = tuple(b for b in bindings if not _PLACEHOLDER.search(b.split("=", 1)[-1]))
        error = _check(task, preset, bindings, world)
        checked += 1
        shown = refused.get((page, number))
        if shown is not None:
            if error is None or not error.endswith(shown):
                failures.append(f"{page}:{number}: the page shows 'error: {shown}', the check "
                                f"gives {error!r}\n    {command}")
        elif error is not None:
            failures.append(f"{page}:{number}: {error}\n    {command}")
    assert checked > 20
    assert not failures, "\n".join(failures)


# ---------------------------------------------------------------------------------------------
# Links and section references


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


@cache
def headings(path: Path) -> tuple[str, ...]:
    out = []
    fence = False
    for line in path.read_text().splitlines():
        if line.strip().startswith(("```", "~~~")):
            fence = not fence
        elif not fence and re.match(r"#{1,6} ", line):
            out.append(line.lstrip("#").strip())
    return tuple(out)


def test_links_resolve() -> None:
    broken = []
    for page in PAGES:
        text = page.read_text()
        for m in re.finditer(r"\]\(([^)\s]+)\)", text):
            target = m.group(1)
            if re.match(r"[a-z]+:", target):
                continue
            path_part, _, anchor = target.partition("#")
            path = (page.parent / path_part).resolve() if path_part else page
            where = f"{rel(page)}:{text[:m.start()].count(chr(10)) + 1}: ({target})"
            if not path.exists():
                broken.append(f"{where}: no file {path_part}")
            elif anchor and path.suffix == ".md" and anchor not in {slug(h) for h in headings(path)}:
                broken.append(f"{where}: no heading with anchor #{anchor} in {path.name}")
    assert not broken, "\n".join(broken)


_DOCS_REF = re.compile(r"docs/([\w-]+\.md)(?:`)?(?:,|:)?\s*(?:\(|\[)?\s*\"([^\"\n]{2,80})\"")
_DOCS_FILE = re.compile(r"docs/([\w-]+\.md)\b")


def _referring_files() -> list[Path]:
    files = list(PAGES)
    for folder in REFERRING:
        files += [p for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".gin", ".sh", ".md")]
    return [p for p in files if p.resolve() != Path(__file__).resolve()]


@cache
def section_starts(path: Path) -> tuple[str, ...]:
    """The lines of a page that can start a section: headings, bold leads (``**Name.**``) and
    paragraphs that open with a name and a colon or a parenthesis, lower-cased, no markup."""
    out = []
    for line in path.read_text().splitlines():
        if re.match(r"#{1,6} |\*\*|[A-Z][\w ()/-]{1,60}:|[A-Z][\w -]{1,60} \(", line):
            out.append(re.sub(r"[`*#]", "", line).strip().lower())
    return tuple(out)


def _section_found(section: str, page: Path) -> bool:
    want = re.sub(r"[`*]", "", section).strip().lower().rstrip(".")
    return any(line.startswith(want) for line in section_starts(page))


def test_section_references_resolve() -> None:
    """``docs/x.md "Section"`` in pages, code, scripts, presets and tests: the page exists and
    has a heading that starts with the section's words."""
    broken = []
    for path in _referring_files():
        text = path.read_text(errors="replace")
        for m in _DOCS_FILE.finditer(text):
            if not (ROOT / "docs" / m.group(1)).is_file():
                broken.append(f"{rel(path)}:{text[:m.start()].count(chr(10)) + 1}: "
                              f"no page docs/{m.group(1)}")
        # a reference may be broken over a line (docstrings, comments): read it joined
        joined = re.sub(r"\s*\n\s*(?:#\s*)?", " ", text)
        for m in _DOCS_REF.finditer(joined):
            page = ROOT / "docs" / m.group(1)
            if page.is_file() and not _section_found(m.group(2), page):
                broken.append(f"{rel(path)}: docs/{m.group(1)} has no section \"{m.group(2)}\"")
    assert not broken, "\n".join(broken)


# ---------------------------------------------------------------------------------------------
# No history of the work

NARRATION = [
    r"\bissues? #?\d+",                       # issue 16, issue #29
    r"\bsessions? \d+",                       # session 4
    r"\b(?:this|that|the|our|earlier|previous|next) session\b",
    r"\bsession's\b",
    r"\b(?:first|second|third|fourth|fifth|sixth|this|that|last|earlier|previous|next) round\b",
    r"\brounds? of (?:work|changes)\b",
    r"\b(?:this|the|on the|a) branch\b",
    r"\bmerge\d+\b",
    r"\bthe (?:lead|helper|integrator)\b",
    r"\b(?:helper|integrator|lead)'s\b",
    r"\bother engineers?\b",
    r"\bbeside (?:a|the|another) (?:ci|test) run|\bbeside (?:another|other) jobs?\b",
    r"\bwhile (?:ci|the slow (?:test )?tier|a test run) ran\b",
    r"\b(?:while|when) (?:writing this|this page was written)\b",
    r"\bwas written\b.*\b(?:no gpu|not yet)\b",
    r"\bno gpu was (?:lent|available)\b",
    r"\bthe issue(?:'s)?\b",
    r"\b(?:before|after|since) this (?:change|round|work)\b",
]
_NARRATION = re.compile("|".join(f"(?:{p})" for p in NARRATION), re.IGNORECASE)


def narrated_lines(text: str) -> list[tuple[int, str]]:
    code = {number for number, _ in code_lines(text)}
    return [(number, m.group(0)) for number, line in enumerate(text.splitlines(), 1)
            if number not in code for m in [_NARRATION.search(line)] if m]


PRESETS = sorted((ROOT / "configs").rglob("*.gin"))
"""The presets: their comments are what a user reads before a run, so they are checked too."""


def test_no_page_narrates_the_work() -> None:
    found = [f"{rel(page)}:{number}: {words!r}" for page in [*PAGES, *PRESETS]
             for number, words in narrated_lines(page.read_text())]
    assert not found, "\n".join(found)


def test_the_narration_patterns_catch_and_spare() -> None:
    caught = ["Second round (issue 16, session 4)", "measured on this branch",
              "beside a CI run", "the lead's merge", "the issue's table", "issue #29"]
    spared = ["rounded up to 64", "3 rounds alternating (`--rounds 3`)", "the jagged index helpers",
              "round-robin", "a session of its own", "beside the model's AUC"]
    assert all(_NARRATION.search(t) for t in caught), [t for t in caught if not _NARRATION.search(t)]
    assert not any(_NARRATION.search(t) for t in spared), [t for t in spared if _NARRATION.search(t)]
