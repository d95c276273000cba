"""What the command families share: the exit statuses, an encrypted
repository's keys (--key-file, $RPOFS_KEY_FILE, $RPOFS_PASSPHRASE, a
prompt), the repository and libvirt opened for a command, --connect."""

import contextlib
import getpass
import os
import sys

from .. import children
from ..errors import RpofsError
from ..store import crypto
from ..store.repo import Repository

EXIT_ERROR = 1
EXIT_USAGE = 2  # argparse's own


def add_connect(parser, help: str = "libvirt URI (default $LIBVIRT_DEFAULT_URI or qemu:///system)") -> None:
    parser.add_argument("--connect", default=os.environ.get("LIBVIRT_DEFAULT_URI", "qemu:///system"),
                        metavar="URI", help=help)


def read_key_file(path: str) -> str:
    """A passphrase: the file's first line, without its line end."""
    try:
        with open(path, encoding="utf-8") as f:
            line = f.readline()
    except OSError as e:
        raise RpofsError(f"cannot read key file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise RpofsError(f"key file {path}: its first line is not UTF-8 text") from None
    text = line.rstrip("\r\n")
    if not text:
        raise RpofsError(f"key file {path}: its first line is empty")
    return text


_SECRETS: dict[str, str] = {}   # taken out of the environment by main() (rpofs.children)


def take_secrets() -> None:
    _SECRETS.update(children.take_secrets())


def env_passphrase() -> str | None:
    """$RPOFS_PASSPHRASE as it was when rpofs started."""
    return _SECRETS.get("RPOFS_PASSPHRASE")


def passphrase_of(repo_path: str, args, config_key_file: str = "") -> str | None:
    """The passphrase from --key-file, the ingester's key_file, $RPOFS_KEY_FILE,
    $RPOFS_PASSPHRASE, or asked on a terminal; None: none to be had."""
    for path in (args.key_file, config_key_file, os.environ.get("RPOFS_KEY_FILE")):
        if path:
            return read_key_file(path)
    if env_passphrase():
        return env_passphrase()
    if sys.stdin.isatty():
        return getpass.getpass(f"passphrase for {repo_path}: ")
    return None


def key_source(repo_path: str, args, config_key_file: str = "") -> crypto.KeySource:
    """Where an encrypted repository's keys come from: asked (and a prompt
    shown) only when the repository turns out to be encrypted."""
    key_fd = getattr(args, "key_fd", None)
    if key_fd is not None:  # a mount started by rpofs mount or rpofs run: the key itself
        chunks = []
        with os.fdopen(key_fd, "rb") as f:
            while block := f.read(64):
                chunks.append(block)
        return crypto.MasterKey(b"".join(chunks))
    return crypto.Passphrase(lambda: passphrase_of(repo_path, args, config_key_file))


def open_repository(repo_path: str, args) -> Repository:
    """The repository, with its keys if it is encrypted; closed at the end
    of a `with`."""
    return Repository.open(repo_path, keys=key_source(repo_path, args))


def open_repository_of_vm(repo_path: str, args, vm: str | None) -> Repository:
    """The repository that holds VM `vm` (a name or UUID): this host's, or
    in an object store another host's that has it (rpofs.store.anyhost);
    the one --host names when it is given. None (a source that names no VM,
    which the command then refuses in its own words): this host's."""
    from ..store import anyhost
    keys = key_source(repo_path, args)
    if getattr(args, "host", None) or not vm:  # main() made repo_path that host's
        return Repository.open(repo_path, keys=keys)
    return anyhost.repository_of_vm(repo_path, vm, keys)


def vm_of(source: str) -> str | None:
    """The VM a VM@TIME... source names, None if it names none."""
    vm, at, _ = source.partition("@")
    return vm if at and vm else None


def connect(args) -> "contextlib.closing":
    """libvirt at --connect, closed at the end of a `with`."""
    from ..virt.client import Connection
    return contextlib.closing(Connection(args.connect))
