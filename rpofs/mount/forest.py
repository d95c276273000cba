"""Every host's VMs in one mount: a repository in an object store mounts its
own tree and the trees of the other hosts' catalogs it follows (replicas,
rpofs.store.hosts) as one.

    /<vm>                 this host's VMs, and the other hosts' whose names
                          are unique
    /<vm>@<host>          another host's VM whose name is taken already
    /.by-uuid/<uuid>      -> ../<vm> (<uuid>@<host> when two hosts hold
                          points of one VM: a VM that moved)

Below a VM's directory everything is its host's Tree's: the forest only
renumbers inodes (tree k's inode i is (k + 1) << SHIFT | i) and makes the
root and .by-uuid/ itself. Operations (rpofs.mount.fs) takes a Forest as it
takes a Tree: the same calls.
"""

import dataclasses
import threading

from .nodes import DIR_MODE, LINK_MODE, VOLATILE_TTL, Attr, NoSuchEntry, NotADirectory, NotASymlink
from .points import BY_UUID
from .tree import Tree

SHIFT = 40                       # a tree's own inode numbers stay below 2**40
_LOCAL = (1 << SHIFT) - 1
ROOT, BY_UUID_INO = 1, 2         # the forest's own inodes (below 1 << SHIFT: no tree's)


@dataclasses.dataclass(frozen=True)
class _Vm:
    name: str        # as the forest shows it
    tree: int        # its tree's index
    dirname: str     # its directory's name in that tree
    uuid: str


class Forest:
    def __init__(self, trees: list[tuple[str, Tree]]):
        """trees: (host, tree), this host's first."""
        self.trees = trees
        self.repo = trees[0][1].repo        # statfs: this host's repository
        self.mounted_at = trees[0][1].mounted_at
        self._links: dict[str, int] = {}    # .by-uuid entry -> inode
        self._link_of: dict[int, str] = {}
        self._lock = threading.Lock()

    def add(self, host: str, tree: Tree) -> None:
        """A host that joined the store: its VMs shown from now on (the
        trees' indexes, hence every inode number given out, stay)."""
        with self._lock:
            self.trees = self.trees + [(host, tree)]

    # -- the forest's own nodes ---------------------------------------------------

    def _vms(self) -> list[_Vm]:
        """Every tree's VMs, named: this host's as its tree names them, another
        host's with @host when the name is taken already."""
        out, taken = [], set()
        for i, (host, tree) in enumerate(self.trees):
            for dirname, uuid in tree.vm_dirs():
                name = dirname if dirname not in taken else f"{dirname}@{host}"
                taken.add(name)
                out.append(_Vm(name, i, dirname, uuid))
        return out

    def _by_uuid(self) -> dict[str, _Vm]:
        out = {}
        for vm in self._vms():
            key = vm.uuid if vm.uuid not in out else f"{vm.uuid}@{self.trees[vm.tree][0]}"
            out[key] = vm
        return out

    def _link_ino(self, key: str) -> int:
        with self._lock:
            ino = self._links.get(key)
            if ino is None:
                ino = self._links[key] = 3 + len(self._links)
                self._link_of[ino] = key
            return ino

    def _own_dir(self, ino: int) -> Attr:
        return Attr(ino, DIR_MODE, 0, self.mounted_at * 1000, VOLATILE_TTL)

    def _link_attr(self, key: str) -> Attr:
        return Attr(self._link_ino(key), LINK_MODE, len(self._link_target(key)), self.mounted_at * 1000,
                    VOLATILE_TTL)

    def _link_target(self, key: str) -> str:
        vm = self._by_uuid().get(key)
        if vm is None:
            raise NoSuchEntry(key)
        return "../" + vm.name

    def _vm_attr(self, vm: _Vm) -> Attr:
        return self._wrap(vm.tree, self.trees[vm.tree][1].lookup(ROOT, vm.dirname))

    # -- inode numbers ---------------------------------------------------------------

    @staticmethod
    def _wrap(i: int, attr: Attr) -> Attr:
        return dataclasses.replace(attr, ino=((i + 1) << SHIFT) | attr.ino)

    def _split(self, ino: int) -> tuple[Tree, int, int]:
        i = (ino >> SHIFT) - 1
        if not 0 <= i < len(self.trees):
            raise NoSuchEntry(f"inode {ino}")
        return self.trees[i][1], i, ino & _LOCAL

    # -- the operations (as Tree's) ------------------------------------------------------

    def getattr(self, ino: int) -> Attr:
        if ino in (ROOT, BY_UUID_INO):
            return self._own_dir(ino)
        if ino in self._link_of:
            return self._link_attr(self._link_of[ino])
        tree, i, local = self._split(ino)
        return self._wrap(i, tree.getattr(local))

    def lookup(self, parent: int, name: str) -> Attr:
        if parent == ROOT:
            if name == BY_UUID:
                return self._own_dir(BY_UUID_INO)
            for vm in self._vms():
                if vm.name == name:
                    return self._vm_attr(vm)
            raise NoSuchEntry(name)
        if parent == BY_UUID_INO:
            if name not in self._by_uuid():
                raise NoSuchEntry(name)
            return self._link_attr(name)
        if parent in self._link_of:
            raise NotADirectory(str(parent))
        tree, i, local = self._split(parent)
        return self._wrap(i, tree.lookup(local, name))

    def readdir(self, ino: int) -> list[tuple[str, Attr]]:
        if ino == ROOT:
            return [(BY_UUID, self._own_dir(BY_UUID_INO))] + [(vm.name, self._vm_attr(vm)) for vm in self._vms()]
        if ino == BY_UUID_INO:
            return [(key, self._link_attr(key)) for key in self._by_uuid()]
        if ino in self._link_of:
            raise NotADirectory(str(ino))
        tree, i, local = self._split(ino)
        return [(name, self._wrap(i, attr)) for name, attr in tree.readdir(local)]

    def known_attr(self, ino: int) -> Attr | None:
        if ino < 1 << SHIFT:
            return None
        tree, i, local = self._split(ino)
        attr = tree.known_attr(local)
        return self._wrap(i, attr) if attr is not None else None

    def wants_attrs(self, ino: int) -> bool:
        if ino < 1 << SHIFT:
            return False
        tree, _, local = self._split(ino)
        return tree.wants_attrs(local)

    def read_attrs(self, inos: list[int]) -> None:
        for ino in inos:
            if ino >= 1 << SHIFT:
                tree, _, local = self._split(ino)
                tree.read_attrs([local])

    def is_own_link(self, ino: int) -> bool:
        if ino < 1 << SHIFT:
            return ino in self._link_of
        tree, _, local = self._split(ino)
        return tree.is_own_link(local)

    def readlink(self, ino: int) -> str:
        if ino in self._link_of:
            return self._link_target(self._link_of[ino])
        if ino < 1 << SHIFT:
            raise NotASymlink(str(ino))
        tree, _, local = self._split(ino)
        return tree.readlink(local)

    def open(self, ino: int):
        if ino < 1 << SHIFT:
            raise NoSuchEntry(f"inode {ino}")
        tree, _, local = self._split(ino)
        return tree.open(local)
