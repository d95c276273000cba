"""Domain errors. Everything below the CLI and the FUSE boundary raises these;
the CLI turns them into one line on stderr, the mount into an errno."""


class RpofsError(Exception):
    """An error with a message meant for the person at the terminal."""


class NoRepository(RpofsError):
    pass


class UnknownFormat(RpofsError):
    pass


class NeedsUpgrade(UnknownFormat):
    """A repository of an earlier format: `rpofs upgrade` converts it."""


class UnknownVM(RpofsError):
    pass


class BadTime(RpofsError):
    pass


class UnsupportedDisk(RpofsError):
    """A disk that rpofs cannot back up as asked (e.g. not qcow2)."""


class VirtError(RpofsError):
    """libvirt or NBD failed; the message says which call and why."""


class ChunkError(RpofsError):
    """Stored data that cannot be returned: the read must fail, never guess."""


class ChunkMissing(ChunkError):
    pass


class PackMissing(ChunkMissing):
    """The pack file is gone: prune may have moved the chunk elsewhere."""


class CorruptChunk(ChunkError):
    pass


class MountError(RpofsError):
    pass


class KeyRequired(RpofsError):
    """An encrypted repository opened without its passphrase or key."""


class WrongKey(RpofsError):
    """The passphrase (or key) is not the repository's."""


class StoreError(RpofsError):
    """An object store (rpofs.store.s3) failed a request, after its retries.
    code: the store's error code ("" for a connection failure), reason: its
    code and message as shown."""

    errno = 5  # EIO

    def __init__(self, message: str, code: str = "", reason: str = ""):
        super().__init__(message)
        self.code = code
        self.reason = reason or message


class StoreUnreachable(StoreError):
    """No answer (refused, timed out) or only 5xx/SlowDown within the bound."""


class StoreAuthError(StoreError):
    """No credentials, or the store refused them."""

    errno = 13  # EACCES


class StoreConflict(StoreError):
    """A conditional write found the object already there."""


class StoreFull(StoreError):
    """The store's quota is reached: what a full disk is to a local repository."""

    errno = 28  # ENOSPC


class TakenOver(RpofsError):
    """Another machine took this repository's host over (init --take-over):
    this one must write to the store no more (rpofs.store.hosts)."""
