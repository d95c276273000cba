"""The floors of rpofs: no import circle among its modules (imports inside
functions count: a lazy import is still a dependency), and the lower floors
import nothing from those above them. Read from the source with ast: nothing
is imported."""

import ast
import pathlib

import pytest

pytestmark = pytest.mark.pure

ROOT = pathlib.Path(__file__).resolve().parent.parent / "rpofs"

# The floors, lowest first (docs/ARCHITECTURE.md draws them): a module
# imports only from its own floor and those below it.
FLOORS = [
    ("rpofs.errors", "rpofs.durable", "rpofs.timefmt", "rpofs.progress", "rpofs.memory", "rpofs.sdnotify",
     "rpofs.children", "rpofs.vmconfig"),                                # small shared pieces
    ("rpofs.store",),                                                   # the repository: catalog, packs, journal
    ("rpofs.virt",),                                                    # libvirt, NBD
    ("rpofs.files", "rpofs.protect", "rpofs.ingest.config", "rpofs.ingest.backup"),  # guest files, the journal, a backup
    ("rpofs.apps",),                                                    # application logs (read through files)
    ("rpofs.mount",),                                                   # the tree (points, instants, apps) and FUSE
    ("rpofs.recover",),                                                 # restore, run (through the tree's resolve)
    ("rpofs.ingest",),                                                  # the daemon, status, metrics
    ("rpofs.cli", "rpofs"),                                             # the command line
]


def floor_of(module: str) -> int:
    """The floor of a module: the most specific package listed that holds it."""
    best, level = "", -1
    for i, members in enumerate(FLOORS):
        for package in members:
            if _under(module, package) and len(package) > len(best):
                best, level = package, i
    return level


def _module_name(path: pathlib.Path, root: pathlib.Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path, name: str, modules: set[str]) -> set[str]:
    """The rpofs modules `path` imports anywhere in it (not those only under
    `if TYPE_CHECKING:`, which never run). `from X import y` counts as
    X.y when that is a module, else as X."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
                   for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # import rpofs.x.y.z as far as it is ours
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(root: pathlib.Path = ROOT) -> dict[str, set[str]]:
    paths = {_module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    modules = set(paths)
    return {name: _imports(path, name, modules) for name, path in paths.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle through each strongly connected set of modules (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            members = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                members.add(w)
                if w == v:
                    break
            if len(members) > 1:
                out.append(_circle(graph, sorted(members)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _circle(graph: dict[str, set[str]], members: list[str]) -> list[str]:
    """A path from the first member back to itself within the set."""
    start, inside = members[0], set(members)
    paths, seen = [[start]], {start}
    while paths:
        path = paths.pop(0)
        for w in sorted(graph[path[-1]] & inside):
            if w == start:
                return path + [start]
            if w not in seen:
                seen.add(w)
                paths.append(path + [w])
    return members


def _under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_no_import_circle():
    found = cycles(import_graph())
    assert not found, "import circles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_lower_floors_import_nothing_from_above():
    wrong = []
    for module, imported in sorted(import_graph().items()):
        wrong += [(module, target) for target in sorted(imported) if floor_of(target) > floor_of(module)]
    assert not wrong, "\n".join(f"{m} (floor {floor_of(m)}) imports {t} (floor {floor_of(t)})" for m, t in wrong)


def test_every_module_has_a_floor():
    assert not [m for m in import_graph() if floor_of(m) < 0]


def test_a_circle_is_found(tmp_path):
    """The check itself: a lazy import that closes a circle, a relative one."""
    pkg = tmp_path / "rpofs"
    (pkg / "low").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "low" / "__init__.py").write_text("")
    (pkg / "low" / "a.py").write_text("def f():\n    from ..high import b\n")
    (pkg / "high.py").write_text("from .low.a import f\n")
    (pkg / "typed.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import high\n")
    graph = import_graph(pkg)
    assert graph["rpofs.high"] == {"rpofs.low.a"} and graph["rpofs.typed"] == set()
    assert cycles(graph) == [["rpofs.high", "rpofs.low.a", "rpofs.high"]]


# third-party libraries imported in one place each (habit 6: narrow boundaries)
ONLY_IN = {"boto3": "rpofs.store.s3", "botocore": "rpofs.store.s3"}


def test_an_object_store_library_is_imported_in_one_module():
    """boto3/botocore only in rpofs/store/s3.py, which turns their errors
    into rpofs's; nothing else knows the library (and a repository without a
    store never imports it)."""
    for path in sorted(ROOT.rglob("*.py")):
        name = _module_name(path, ROOT)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                roots = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                roots = [(node.module or "").split(".")[0]]
            else:
                continue
            for lib in roots:
                assert ONLY_IN.get(lib, name) == name, f"{name} imports {lib} (only {ONLY_IN[lib]} may)"
