"""Starting and stopping the mount.

`rpofs mount` starts `rpofs mount --foreground` as a detached child and
returns once the child says the mount is ready, or prints the child's error.
The child opens the repository itself: nothing LMDB crosses a fork. An
encrypted repository's master key goes to the child through a pipe it
inherits (--key-fd), never its arguments or environment.
"""

import errno
import logging
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass

import pyfuse3
import trio

from .. import sdnotify
from ..children import child_env
from ..errors import MountError, RpofsError
from ..store.repo import Repository
from .fs import Operations
from .forest import Forest
from .tree import Tree

log = logging.getLogger(__name__)

READ_AHEAD_KB = 4096  # FUSE's default 128 KiB window caps sequential reads
FOLLOW_S = 5          # a mount of another host's VMs reads its new publications this often


@dataclass(frozen=True)
class MountOptions:
    repo: str
    mountpoint: str
    allow_other: bool = False
    log_file: str = ""
    journal_spacing_s: float = 1.0   # protected VMs: one listed instant per this much journal activity


def check_mountpoint(path: str) -> None:
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            raise MountError(f"{path} is a mount whose daemon died: run rpofs umount {path} first") from None
    if not os.path.isdir(path):
        raise MountError(f"mountpoint {path} does not exist or is not a directory")
    if _mounted(path):
        raise MountError(f"mountpoint {path} is busy: something is already mounted there")
    try:
        with os.scandir(path) as entries:
            holds_files = next(entries, None) is not None
    except OSError as e:
        raise MountError(f"mountpoint {path} cannot be read: {e.strerror}") from None
    if holds_files:
        raise MountError(f"mountpoint {path} is not empty: the mount would hide its files (use an empty directory)")


def mount_background(opts: MountOptions, keys=None) -> None:
    """Start the mount daemon; return when the mount is ready. keys: as
    Repository.open takes them."""
    check_mountpoint(opts.mountpoint)
    repo = Repository.open(opts.repo, keys=keys)  # a clear error here beats one in the log
    master = repo.master_key()
    repo.close()
    start_mount(opts, master).wait()


class StartingMount:
    """A mount daemon started and not yet known to be ready: its starter can
    do other work meanwhile (`rpofs run` prepares its VM), then wait()."""

    def __init__(self, read_fd: int, log_path: str):
        self._read_fd = read_fd
        self._log_path = log_path

    def wait(self) -> None:
        """Return once the mount serves; MountError with the daemon's own
        error if it failed."""
        if self._read_fd < 0:
            return
        with os.fdopen(self._read_fd) as ready:
            self._read_fd = -1
            answer = ready.read().strip()
        if answer != "ready":
            raise MountError(answer.removeprefix("error: ") or f"the mount daemon died; see {self._log_path}")


def start_mount(opts: MountOptions, master_key: bytes | None = None) -> StartingMount:
    """Start `rpofs mount --foreground` as a detached child; it opens the
    repository itself (nothing of LMDB crosses a fork, and this process may
    hold the repository open: LMDB must not be opened twice in one process).
    master_key: an encrypted repository's (Repository.master_key), written
    into a pipe whose read end the child inherits."""
    read_fd, write_fd = os.pipe()
    log_path = opts.log_file or os.path.join(opts.repo, "mount.log")
    cmd = [sys.executable, "-m", "rpofs.cli", "--repo", opts.repo, "mount", opts.mountpoint,
           "--foreground", "--ready-fd", str(write_fd)]
    if opts.allow_other:
        cmd.append("--allow-other")
    if opts.journal_spacing_s != MountOptions.journal_spacing_s:
        cmd += ["--journal-spacing", str(opts.journal_spacing_s)]
    pass_fds = [write_fd]
    if master_key is not None:
        key_read, key_write = os.pipe()
        try:
            os.write(key_write, master_key)  # 32 bytes: the pipe holds them until the child reads
        finally:
            os.close(key_write)
        cmd += ["--key-fd", str(key_read)]
        pass_fds.append(key_read)
    try:
        try:
            log_out = open(log_path, "ab")
        except OSError as e:
            os.close(read_fd)
            os.close(write_fd)
            raise MountError(f"cannot write the mount log {log_path}: {e.strerror}") from None
        with log_out:
            subprocess.Popen(cmd, pass_fds=pass_fds, stdin=subprocess.DEVNULL, stdout=log_out,
                             stderr=log_out, start_new_session=True, close_fds=True, env=child_env())
    finally:
        for fd in pass_fds[1:]:
            os.close(fd)
    os.close(write_fd)
    return StartingMount(read_fd, log_path)


def mount_foreground(opts: MountOptions, ready_fd: int | None = None, keys=None) -> None:
    """Serve the mount until it is unmounted or a signal arrives. If ready_fd
    is given, one line goes there: "ready" or "error: ...". keys: as
    Repository.open takes them."""
    tell = _Teller(ready_fd)
    try:
        check_mountpoint(opts.mountpoint)
        repo = Repository.open(opts.repo, keys=keys)
    except RpofsError as e:
        tell(f"error: {e}")
        raise
    repos = [repo]
    try:
        repos += _other_hosts(repo, keys)
        trees = [(r.host, Tree(r, journal_spacing_s=opts.journal_spacing_s)) for r in repos]
        forest = Forest(trees) if repo.publishes else None   # (a host may join the store later)
        ops = Operations(forest or trees[0][1])
        options = set(pyfuse3.default_options) - {"default_permissions"}
        options |= {f"fsname=rpofs:{opts.repo}", "subtype=rpofs", "ro"}
        if opts.allow_other:
            options |= {"allow_other", "default_permissions"}
        try:
            pyfuse3.init(ops, opts.mountpoint, options)
        except RuntimeError as e:
            raise MountError(f"cannot mount at {opts.mountpoint}: {e}") from None
        try:
            trio.run(_serve, opts, tell, repos, forest, keys)
        finally:
            pyfuse3.close(unmount=True)
    except RpofsError as e:
        tell(f"error: {e}")
        raise
    finally:
        for r in repos:
            r.close()


def _other_hosts(repo: Repository, keys) -> list[Repository]:
    """A repository in an object store: the other hosts' catalogs, as this
    machine follows them (rpofs.mount.forest shows their VMs beside its
    own). A host whose catalog cannot be read here (another key, the store
    unreachable before it was ever followed) is left out with a warning."""
    if not repo.publishes:
        return []
    from ..store import anyhost, hosts
    out = []
    try:
        names = anyhost.other_hosts(repo.path)
    except RpofsError as e:
        log.warning("the other hosts of the store are not shown: %s", e)
        return []
    for name in names:
        try:
            out.append(Repository.open(hosts.ensure_replica(repo.path, repo.store_conf, name), keys=keys))
        except RpofsError as e:
            log.warning("host %s's VMs are not shown: %s", name, e)
    return out


def _new_hosts(repos: list[Repository], forest: Forest, keys, opts: MountOptions) -> None:
    """Hosts that joined the store since the mount began, added to it."""
    from ..store import anyhost, hosts
    shown = {r.host for r in repos}
    try:
        names = [n for n in anyhost.other_hosts(repos[0].path) if n not in shown]
    except RpofsError as e:
        log.warning("the store's hosts are not listed now: %s", e)
        return
    for name in names:
        try:
            replica = Repository.open(hosts.ensure_replica(repos[0].path, repos[0].store_conf, name), keys=keys)
        except RpofsError as e:
            log.warning("host %s's VMs are not shown: %s", name, e)
            continue
        repos.append(replica)
        forest.add(name, Tree(replica, journal_spacing_s=opts.journal_spacing_s))
        log.info("event=host-joined host=%s", name)


async def _serve(opts: MountOptions, tell, repos: list[Repository], forest: Forest | None, keys) -> None:
    async with trio.open_nursery() as nursery:
        async def follow_the_hosts():
            # other hosts' VMs (replicas): their new points within FOLLOW_S of their publication,
            # and the VMs of a host that joined the store since the mount began
            while True:
                await trio.sleep(FOLLOW_S)
                for repo in list(repos):
                    if repo.replica:
                        try:
                            await trio.to_thread.run_sync(repo.follow)
                        except RpofsError as e:
                            log.warning("host %s: its new publications are not read yet: %s", repo.host, e)
                if forest is not None:
                    await trio.to_thread.run_sync(_new_hosts, repos, forest, keys, opts)

        async def stop_on_signal():
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
                async for _ in signals:
                    pyfuse3.terminate()
                    return

        async def announce_when_serving():
            # The stat is answered only once the kernel's INIT handshake is
            # done: then the mount serves, and read-ahead can be widened (the
            # handshake itself would shrink it back to 128 KiB).
            await trio.to_thread.run_sync(os.stat, opts.mountpoint)
            _widen_read_ahead(opts.mountpoint)
            log.info("mounted %s at %s", opts.repo, opts.mountpoint)
            tell("ready")
            sdnotify.ready()

        nursery.start_soon(stop_on_signal)
        nursery.start_soon(announce_when_serving)
        if any(r.replica for r in repos):
            nursery.start_soon(follow_the_hosts)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def _widen_read_ahead(mountpoint: str) -> None:
    dev = _mount_table().get(mountpoint)
    if dev is None:
        log.warning("cannot find %s in /proc/self/mountinfo to widen read-ahead", mountpoint)
        return
    path = f"/sys/class/bdi/{dev}/read_ahead_kb"
    try:
        with open(path, "w") as f:
            f.write(str(READ_AHEAD_KB))
    except OSError as e:
        log.warning("cannot widen read-ahead (%s): %s", path, e.strerror)


class _Teller:
    """Writes one line to the starting process, once, then closes the pipe."""

    def __init__(self, fd: int | None):
        self._fd = fd

    def __call__(self, message: str) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.write(fd, message.encode() + b"\n")
        except OSError:
            pass  # the starter is gone; nothing to tell
        finally:
            os.close(fd)


def _mounted(path: str) -> bool:
    """From the mount table: a mount whose daemon died fails stat, so
    os.path.ismount cannot tell."""
    return path in _mount_table()


def _mount_table() -> dict[str, str]:
    """mount point -> its device number "major:minor", from /proc/self/mountinfo
    (which escapes space, tab, newline and backslash as octal)."""
    table = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            table[_unescape(fields[4])] = fields[2]
    return table


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts_of(repo: str) -> list[str]:
    """Where this repository is mounted now (its fsname names it)."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            fstype, source = fields[fields.index("-") + 1:][:2]
            if fstype == "fuse.rpofs" and _unescape(source) == f"rpofs:{repo}":
                found.append(_unescape(fields[4]))
    return found


def unmount(mountpoint: str) -> None:
    if not _mounted(mountpoint):
        raise MountError(f"{mountpoint} is not mounted")
    result = subprocess.run(["fusermount3", "-u", mountpoint], capture_output=True, text=True, env=child_env())
    if result.returncode != 0:
        raise MountError(result.stderr.strip().splitlines()[-1] if result.stderr.strip()
                         else f"cannot unmount {mountpoint}")
