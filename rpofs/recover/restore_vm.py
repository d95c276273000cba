"""`rpofs restore VM@TIME --vm`: a whole VM back as a libvirt domain, its
disks written out of the repository (no mount), defined from the point's
captured XML.

As a copy (`--name`, or a default name): new UUID and MACs, disks in DIR as
<name>-<disk>.qcow2 (or .raw). With `--replace`: the original domain (same
name and UUID), which must be shut off and `--force` given; its disks are
written to the paths the domain uses (or into DIR when given).

Nothing is half done, whatever fails:
* room for every disk is checked before the first byte is written (the data
  a disk holds at the point, from the index alone);
* each disk is written as <dest>.part, flushed, then renamed;
* for --replace, the old images are renamed aside (<dest>.rpofs-old) and the
  new definition made; only when libvirt accepted it are the old images
  deleted; if it refuses, the old images and definition come back.

qcow2 images are written through qemu-nbd (rpofs.virt.nbdexport.ImageWriter):
only the ranges that hold data are written, so the image stays as sparse as
the point; raw images are written sparse like `rpofs restore`.
"""

import contextlib
import logging
import os
import stat
import uuid as uuidlib
from dataclasses import dataclass

from .. import durable
from ..errors import RpofsError
from ..mount.tree import Moment, resolve
from ..progress import Progress
from ..store.repo import Repository
from ..store.schema import PointRecord
from ..virt.client import Connection
from . import domainxml, images
from .boot import check_dir, check_name, default_name, place_boot_state

log = logging.getLogger(__name__)

DEFAULT_DIR = "/var/lib/libvirt/images"
ROOM_MARGIN = 1.02       # qcow2 metadata: ~0.2 % at 64 KiB clusters, and some slack
ROOM_SLACK = 32 << 20


@dataclass(frozen=True)
class VmRestoreOptions:
    name: str | None = None    # None: the default name (VM-HHMM of the point)
    dir: str = ""              # "": DEFAULT_DIR for a copy, the domain's own paths for --replace
    format: str = "qcow2"      # "qcow2" | "raw"
    replace: bool = False
    force: bool = False
    start: bool = False


@dataclass(frozen=True)
class VmRestored:
    name: str
    uuid: str
    disks: dict[str, str]      # target -> image written
    bytes_written: int
    notes: tuple[str, ...]
    moment: Moment               # what VM@TIME named


def restore_vm(repo: Repository, conn: Connection, vm: str, when: str, opts: VmRestoreOptions) -> VmRestored:
    if opts.format not in ("qcow2", "raw"):
        raise RpofsError(f"--format {opts.format}: qcow2 or raw")
    if opts.replace and opts.name is not None:
        raise RpofsError("--replace restores the VM itself under its own name: leave out --name")
    if opts.name is not None:
        check_name(opts.name)
    folder = check_dir(opts.dir or DEFAULT_DIR) if not opts.replace else ""
    moment = resolve(repo, vm, when)  # as at/ does: a journal instant's disks are read through its journal
    point = moment.point
    captured = repo.read_chunk(bytes.fromhex(point.domain_xml)).decode()
    if opts.replace:
        name, dom_uuid = point.vm_name, point.vm
        current = _replaceable(conn, point, opts.force)
        paths = _replace_paths(point, current, opts)
    else:
        if opts.name is not None and conn.has_domain(opts.name):
            raise RpofsError(f"a VM named {opts.name!r} exists already: choose another --name")
        name = opts.name if opts.name is not None else default_name(point, conn.has_domain)
        dom_uuid = str(uuidlib.uuid4())
        paths = {d.target: os.path.join(folder, f"{name}-{d.target}.{opts.format}") for d in point.disks}
        for path in paths.values():
            if os.path.lexists(path):
                raise RpofsError(f"{path} exists already: remove it or choose another --name or --dir")
    workdir = os.path.dirname(next(iter(paths.values())))
    nvram_path = os.path.join(workdir, f"{name}_VARS.fd")  # beside the disks
    # the definition first: what is wrong with it is found before any writing
    prepared = domainxml.prepare(captured, domainxml.Recovery(
        name=name, uuid=dom_uuid, new_identity=not opts.replace,
        disks=tuple(domainxml.NewDisk(t, p, opts.format) for t, p in paths.items()),
        workdir=workdir, nvram=nvram_path if domainxml.uses_nvram(captured) else ""))
    readers = {d.target: moment.reader(d.target, whole=True) for d in point.disks}
    _check_room(readers, paths)
    written, made = 0, []
    try:
        with Progress(f"restoring {name}", sum(r.size for r in readers.values())) as progress:
            for target, reader in readers.items():
                part = paths[target] + ".part"
                made.append(part)
                written += images.write_disk(reader, part, opts.format, progress.add)
        boot = place_boot_state(repo, point, captured, workdir, name, nvram_path=nvram_path + ".part")
        made += boot.files
        finals = {part: part[:-len(".part")] for part in made}
        dom = _switch(conn, prepared.xml, finals, replace=opts.replace)
    except BaseException:
        for path in made:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        raise
    notes = ([moment.note()] if moment.note() else []) + list(prepared.notes) + boot.notes
    tpm = boot.place_tpm(dom.uuid)
    if tpm:
        log.info("%s: TPM state placed at %s", name, tpm)
    if opts.start:
        dom.start()
    return VmRestored(name, dom.uuid, paths, written, tuple(notes), moment)


def _replaceable(conn: Connection, point: PointRecord, force: bool):
    """The original domain for --replace (None if it no longer exists)."""
    try:
        dom = conn.domain(point.vm)
    except RpofsError:
        return None
    if dom.is_running():
        raise RpofsError(f"{dom.name} is running: shut it down first (virsh shutdown {dom.name}); "
                         f"--replace never stops a VM")
    if not force:
        raise RpofsError(f"--replace overwrites the disks of {dom.name}: add --force to do it")
    return dom


def _replace_paths(point: PointRecord, current, opts: VmRestoreOptions) -> dict[str, str]:
    if opts.dir:
        folder = os.path.abspath(opts.dir)
        if not os.path.isdir(folder):
            raise RpofsError(f"--dir {folder}: no such directory")
        return {d.target: os.path.join(folder, f"{point.vm_name}-{d.target}.{opts.format}") for d in point.disks}
    sources = current.disk_sources() if current is not None else {}
    paths = {}
    for d in point.disks:
        path = sources.get(d.target) or d.source
        if not path or not os.path.isabs(path) or _is_block_device(path):
            raise RpofsError(f"cannot tell where disk {d.target} of {point.vm_name} belongs: give --dir")
        paths[d.target] = path
    return paths


def _is_block_device(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def _check_room(readers: dict, paths: dict[str, str]) -> None:
    """Before writing anything: each filesystem has room for the data its
    disks hold at the point (read from the index; zeros take no room)."""
    need: dict[int, int] = {}
    where: dict[int, str] = {}
    for target, reader in readers.items():
        folder = os.path.dirname(paths[target])
        dev = os.stat(folder).st_dev
        held = images.data_bytes(reader)
        need[dev] = need.get(dev, 0) + int(held * ROOM_MARGIN) + ROOM_SLACK
        where[dev] = folder
    for dev, n in need.items():
        st = os.statvfs(where[dev])
        free = st.f_bavail * st.f_frsize
        if free < n:
            raise RpofsError(f"{where[dev]} has {free >> 20} MiB free; the restored disks need "
                             f"{n >> 20} MiB there: nothing was written")


def _switch(conn: Connection, xml: str, finals: dict[str, str], replace: bool):
    """Put the new files in place and define the domain; for --replace the
    old files are set aside first and come back if libvirt refuses."""
    aside, placed = [], []
    try:
        if replace:
            for final in finals.values():
                if os.path.lexists(final):
                    os.replace(final, final + ".rpofs-old")
                    aside.append(final)
        for part, final in finals.items():
            os.replace(part, final)
            placed.append(final)
        for folder in {os.path.dirname(p) for p in finals.values()}:
            durable.sync_dir(folder)
        dom = conn.define(xml)
    except BaseException:
        for final in placed:  # back to .part, which the caller deletes
            os.replace(final, final + ".part")
        for final in aside:
            os.replace(final + ".rpofs-old", final)
        raise
    if replace:  # the old images' bitmaps are gone with them: the next backup is a full
        dom.forget_checkpoints()
    for final in aside:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(final + ".rpofs-old")
    return dom

