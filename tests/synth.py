"""Repositories filled without libvirt: in-memory disks recorded through the
same BackupWriter the ingester uses."""

import uuid

from rpofs.store.repo import Repository
from rpofs.store.schema import BLOCK_SIZE, CHUNK_SIZE, DiskRecord
from rpofs.timefmt import US

VM = str(uuid.UUID(int=7))
T0 = 1_795_546_770 * US  # 2026-11-24T18:59:30Z


def back_up(repo, disks, dirty, kind, parent, time_us, vm_name="m", xml=b"<domain><name>m</name></domain>", vm=VM):
    """Record one point from in-memory disks, as the ingester does from NBD:
    a full reads every chunk, a log reads every block marked dirty."""
    with repo.begin_writer() as w:
        for d, data in enumerate(disks):
            if kind == "full":
                for c in range(0, len(data), CHUNK_SIZE):
                    w.put_full_chunk(d, c // CHUNK_SIZE, bytes(data[c:c + CHUNK_SIZE]))
            else:
                for b in sorted(dirty[d]):
                    w.put_log_block(d, b, bytes(data[b * BLOCK_SIZE:(b + 1) * BLOCK_SIZE]))
        xml, _ = w.put_chunk(xml)
        return w.commit(
            vm=vm, vm_name=vm_name, time_us=time_us, parent=None if kind == "full" else parent,
            consistency="crash-consistent",
            disks=[DiskRecord(f"vd{chr(97 + i)}", len(x)) for i, x in enumerate(disks)],
            checkpoint="", domain_xml=xml.hex())


def write(disk: bytearray, dirty: set, off: int, data: bytes) -> None:
    disk[off:off + len(data)] = data
    dirty.update(range(off // BLOCK_SIZE, (off + len(data) - 1) // BLOCK_SIZE + 1))


def format_2_full(path, disk, monkeypatch, time_us=1_000_000):
    """A repository as format 2 wrote it, with one full of `disk`: full
    chunks as whole records. Returns (the repository, open, and the point)."""
    from rpofs.store import repo as repo_mod
    with monkeypatch.context() as m:
        m.setattr(repo_mod, "FORMAT", 2)
        m.setattr(repo_mod.BackupWriter, "put_pieced_chunk", repo_mod.BackupWriter.put_chunk)
        repo = repo_mod.Repository.init(path)
        point = back_up(repo, [disk], [set()], "full", None, time_us)
    return repo, point


def three_points(path, rnd):
    """A repository of one VM "m" with three points of one 2.5 MiB disk: a full
    at T0, logs at T0 + 10.25 s and T0 + 10.75 s. (repository, disk, points)."""
    repo = Repository.init(str(path))
    disk = bytearray(rnd.randbytes(2 * CHUNK_SIZE)) + bytearray(CHUNK_SIZE // 2)
    full = back_up(repo, [disk], [set()], "full", None, T0)
    write(disk, dirty := set(), 5000, b"\x01" * 3000)
    log1 = back_up(repo, [disk], [dirty], "log", full, T0 + 10 * US + 250_000)
    write(disk, dirty := set(), CHUNK_SIZE + 7, b"\x02" * 100)
    log2 = back_up(repo, [disk], [dirty], "log", log1, T0 + 10 * US + 750_000)
    return repo, disk, (full, log1, log2)
