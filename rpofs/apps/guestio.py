"""Reading a guest's files through its agent (qemu-ga's guest-file-open,
-seek, -read, -close): nothing installed in the guest, no freeze, no backup
job. Every read is bounded: qemu-ga answers a read with one JSON reply that
holds the bytes in base64, so READ_CALL bytes a call keep each reply small,
and a file's round reads at most ROUND_LIMIT (a backlog ships over rounds)."""

import base64
import contextlib

from ..virt.client import AgentFileError, Domain

READ_CALL = 1 << 20
ROUND_LIMIT = 16 << 20


class GuestFileMissing(AgentFileError):
    """The file is not there (or not readable): not an error for a log that comes and goes."""


class AgentFile:
    """One open guest file: read(offset, length). Each agent call is a round
    trip through libvirtd (~10 ms measured here), so a read seeks only when
    it does not start where the last one ended, and a round asks no size: a
    read that comes back short has met the end of the file."""

    def __init__(self, dom: Domain, path: str, handle: int):
        self.dom, self.path, self.handle = dom, path, handle
        self._position = 0   # a file opens at its start

    def read(self, offset: int, length: int) -> bytes:
        """Up to `length` bytes from `offset` (fewer at the end of the file)."""
        if offset != self._position:
            self.dom.agent("guest-file-seek", {"handle": self.handle, "offset": offset, "whence": "set"})
            self._position = offset
        parts, got = [], 0
        while got < length:
            reply = self.dom.agent("guest-file-read", {"handle": self.handle, "count": min(READ_CALL, length - got)})
            data = base64.b64decode(reply.get("buf-b64", ""))
            parts.append(data)
            got += len(data)
            self._position += len(data)
            if reply.get("eof") or not data:
                break
        return b"".join(parts)


@contextlib.contextmanager
def open_file(dom: Domain, path: str):
    """An AgentFile, closed on the way out. GuestFileMissing when the guest
    cannot open it; AgentUnavailable when the agent does not answer."""
    try:
        handle = dom.agent("guest-file-open", {"path": path, "mode": "r"})
    except AgentFileError as e:
        raise GuestFileMissing(str(e)) from e
    try:
        yield AgentFile(dom, path, handle)
    finally:
        with contextlib.suppress(AgentFileError):
            dom.agent("guest-file-close", {"handle": handle})


def glob(dom: Domain, pattern: str) -> list[str]:
    """The regular files a glob names in the guest, sorted. The agent has no
    directory listing, so this is the one place a shipper runs a program in
    the guest (its /bin/sh); a pattern without wildcards needs none."""
    if not any(c in pattern for c in "*?["):
        return [pattern]
    script = f'for f in {pattern}; do [ -f "$f" ] && echo "$f"; done; true'
    return sorted(line for line in dom.agent_run("/bin/sh", ["-c", script]).splitlines() if line)
