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
