"""libvirt, and only here: domains, their disks, pull-mode backup jobs and
checkpoints. libvirt errors become rpofs errors (VirtError and friends)."""

import base64
import contextlib
import json
import logging
import time
import os
from dataclasses import dataclass
from typing import NamedTuple
from xml.etree import ElementTree as ET
from xml.sax.saxutils import quoteattr

import libvirt
import libvirt_qemu

from ..errors import UnknownVM, VirtError

CHECKPOINT_PREFIX = "rpofs-"
log = logging.getLogger(__name__)

# libvirt prints every error to stderr unless told otherwise; we report our own.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


class CheckpointUnusable(VirtError):
    """The checkpoint a log backup would build on is missing or inconsistent."""


class AgentUnavailable(VirtError):
    """The guest agent did not freeze (absent, not answering, or refused)."""


class AgentFileError(VirtError):
    """The agent answered, but the file operation failed (no such file, ...)."""


@dataclass(frozen=True)
class GuestFilesystem:
    mountpoint: str   # "/data/db"
    device: str       # the guest's name for it: "vdb", "vda1", "dm-0"
    fstype: str
    targets: tuple[str, ...]  # libvirt disk targets it is on


@dataclass(frozen=True)
class DiskInfo:
    target: str    # "vda"
    format: str    # "qcow2", "raw", ...
    source: str    # host path (file or block device)
    size: int      # virtual size in bytes


class BlockJob(NamedTuple):
    """How far a disk's block job (a copy, a mirror, a merge) has come."""
    done: int      # bytes
    total: int     # bytes (a mirror's grows while the guest writes); 0 until libvirt knows it


@dataclass(frozen=True)
class DomainInfo:
    uuid: str
    name: str
    running: bool
    disks: tuple[DiskInfo, ...]
    xml: str       # the persistent definition when there is one, else the live one
    firmware: dict[str, str] = None  # kind ("nvram", "tpm") -> host file holding that boot state


SWTPM_STATE = {"2.0": "tpm2/tpm2-00.permall", "1.2": "tpm1.2/tpm-00.permall"}
SWTPM_DIR = "/var/lib/libvirt/swtpm"


def firmware_files(live: ET.Element, uuid: str) -> dict[str, str]:
    """The files a domain's boot state lives in, from its live XML: the UEFI
    variable store (<os><nvram>) and swtpm's state file (an emulated TPM's
    state lives under SWTPM_DIR/<uuid>/, libvirt's layout)."""
    files = {}
    nvram = live.find("./os/nvram")
    if nvram is not None and (nvram.text or "").strip():
        files["nvram"] = nvram.text.strip()
    backend = live.find("./devices/tpm/backend[@type='emulator']")
    if backend is not None:
        files["tpm"] = os.path.join(SWTPM_DIR, uuid, SWTPM_STATE.get(backend.get("version", "2.0"),
                                                                      SWTPM_STATE["2.0"]))
    return files


@contextlib.contextmanager
def _translated(what: str):
    try:
        yield
    except libvirt.libvirtError as e:
        code = e.get_error_code()
        if code in (libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT, libvirt.VIR_ERR_CHECKPOINT_INCONSISTENT):
            raise CheckpointUnusable(f"{what}: {e.get_error_message()}") from e
        raise VirtError(f"{what}: {e.get_error_message()}") from e


class Connection:
    def __init__(self, uri: str):
        self.uri = uri
        with _translated(f"cannot connect to libvirt at {uri}"):
            self._conn = libvirt.open(uri)

    def alive(self) -> bool:
        try:
            return bool(self._conn.isAlive())
        except libvirt.libvirtError:
            return False

    def running_domains(self) -> list["Domain"]:
        with _translated(f"listing the VMs on {self.uri}"):
            return [Domain(d) for d in self._conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)]

    def domain(self, ref: str) -> "Domain":
        """A domain by name or UUID."""
        for lookup in (self._conn.lookupByName, self._conn.lookupByUUIDString):
            try:
                return Domain(lookup(ref))
            except libvirt.libvirtError as e:
                if e.get_error_code() not in (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_INVALID_ARG):
                    raise VirtError(f"looking up VM {ref!r}: {e.get_error_message()}") from e
        raise UnknownVM(f"no VM named {ref!r} on {self.uri}")

    def has_domain(self, name: str) -> bool:
        try:
            self._conn.lookupByName(name)
            return True
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return False
            raise VirtError(f"looking up VM {name!r}: {e.get_error_message()}") from e

    def define(self, xml: str) -> "Domain":
        """Define a persistent domain, its XML validated against libvirt's
        schema first, so a refusal names the element at fault."""
        try:
            return Domain(self._conn.defineXMLFlags(xml, libvirt.VIR_DOMAIN_DEFINE_VALIDATE))
        except libvirt.libvirtError as e:
            message = " ".join(e.get_error_message().split())
            raise VirtError(f"libvirt refuses the domain definition: {message}") from e

    def close(self) -> None:
        with contextlib.suppress(libvirt.libvirtError):
            self._conn.close()


class Domain:
    def __init__(self, dom: "libvirt.virDomain"):
        self._dom = dom
        self.name = dom.name()
        self.uuid = dom.UUIDString()

    def uri(self) -> str:
        """The libvirt URI of the connection this domain was found on."""
        with _translated(f"asking libvirt where {self.name} is"):
            return self._dom.connect().getURI()

    def info(self) -> DomainInfo:
        with _translated(f"reading the definition of {self.name}"):
            running = bool(self._dom.isActive())
            live = ET.fromstring(self._dom.XMLDesc(0))
            flags = libvirt.VIR_DOMAIN_XML_INACTIVE if self._dom.isPersistent() else 0
            xml = self._dom.XMLDesc(flags)
            disks = []
            for disk in live.findall("./devices/disk[@device='disk']"):
                target = disk.find("target").get("dev")
                driver = disk.find("driver")
                source = disk.find("source")
                path = "" if source is None else (source.get("file") or source.get("dev") or "")
                size = self._dom.blockInfo(target)[0]
                disks.append(DiskInfo(target, driver.get("type", "raw") if driver is not None else "raw",
                                      path, size))
        return DomainInfo(self.uuid, self.name, running, tuple(disks), xml, firmware_files(live, self.uuid))

    def is_running(self) -> bool:
        with _translated(f"asking whether {self.name} runs"):
            return bool(self._dom.isActive())

    def xml(self, inactive: bool = False) -> str:
        with _translated(f"reading the definition of {self.name}"):
            return self._dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0)

    def disk_sources(self) -> dict[str, str]:
        """target -> the file or device each disk (device='disk') reads now."""
        out = {}
        for disk in ET.fromstring(self.xml()).findall("./devices/disk[@device='disk']"):
            source = disk.find("source")
            if source is not None:
                out[disk.find("target").get("dev")] = source.get("file") or source.get("dev") or ""
        return out

    # -- life cycle ----------------------------------------------------------

    def start(self) -> None:
        with _translated(f"starting {self.name}"):
            self._dom.create()

    def destroy(self) -> None:
        """Power off at once; nothing if it is not running."""
        try:
            self._dom.destroy()
        except libvirt.libvirtError as e:
            if e.get_error_code() != libvirt.VIR_ERR_OPERATION_INVALID:
                raise VirtError(f"stopping {self.name}: {e.get_error_message()}") from e

    def undefine(self) -> None:
        """Remove the definition with its checkpoints' metadata, its UEFI
        variable store and its TPM state (libvirt refuses to undefine a
        domain with checkpoints or a variable store unless told)."""
        flags = (libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
                 | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                 | libvirt.VIR_DOMAIN_UNDEFINE_TPM)
        try:
            self._dom.undefineFlags(flags)
        except libvirt.libvirtError as e:
            if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise VirtError(f"undefining {self.name}: {e.get_error_message()}") from e

    def forget_checkpoints(self) -> list[str]:
        """Drop the metadata of every checkpoint (their bitmaps live in the
        images being replaced); the names dropped."""
        with _translated(f"listing checkpoints of {self.name}"):
            cps = self._dom.listAllCheckpoints(0)
        names = []
        for cp in reversed(cps):
            with _translated(f"dropping checkpoint {cp.getName()} of {self.name}"):
                cp.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
            names.append(cp.getName())
        return names

    # -- copying a running VM's disks (block copy, then pivot) ----------------

    def block_copy(self, target: str, dest: str, shallow: bool = False) -> None:
        """Start copying disk `target` into the qcow2 image `dest` while the
        guest runs; guest writes go to both from then on. shallow: `dest`
        exists, its backing chain already holds what the disk's backing
        chain holds, and only the top image is copied; else libvirt creates
        `dest` and copies the whole chain. A transient job: allowed on a
        persistent domain, and gone with QEMU."""
        xml = f"<disk type='file'><driver type='qcow2'/><source file={quoteattr(dest)}/></disk>"
        flags = libvirt.VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB
        if shallow:
            flags |= libvirt.VIR_DOMAIN_BLOCK_COPY_SHALLOW | libvirt.VIR_DOMAIN_BLOCK_COPY_REUSE_EXT
        with _translated(f"starting to copy disk {target} of {self.name}"):
            self._dom.blockCopy(target, xml, {}, flags)

    # -- continuous protection: an active mirror into the journal server ------

    def start_mirror(self, target: str, socket: str) -> None:
        """Mirror disk `target` to export `target` of the NBD server at
        `socket`, write-blocking: a guest write completes only once the
        server answered it (VIR_DOMAIN_BLOCK_COPY_SYNCHRONOUS_WRITES, QEMU's
        copy-mode=write-blocking). A transient job (allowed on a persistent
        domain, gone with QEMU), never pivoted: cancel_block_job ends it."""
        xml = (f"<disk type='network'><driver type='raw'/><source protocol='nbd' name={quoteattr(target)}>"
               f"<host transport='unix' socket={quoteattr(socket)}/></source></disk>")
        flags = (libvirt.VIR_DOMAIN_BLOCK_COPY_REUSE_EXT | libvirt.VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB
                 | libvirt.VIR_DOMAIN_BLOCK_COPY_SYNCHRONOUS_WRITES)
        with _translated(f"starting to mirror disk {target} of {self.name} into the journal"):
            self._dom.blockCopy(target, xml, {}, flags)

    def let_go_of_nbd(self, socket: str) -> list[str]:
        """Cut QEMU's NBD connections to the server at `socket` (QMP `yank`
        of each NBD node whose file names it), so that the writes waiting
        on an unresponsive server fail at once and a write-blocking mirror
        into it completes the guest's writes and ends (measured here: a
        guest's writes went on 0.2 s after the yank, with the server
        stopped by SIGSTOP). Returns the node names let go. libvirt has no
        API for it: it is sent as a QEMU monitor command (libvirt notes the
        domain as tainted by one)."""
        nodes = self._qmp("query-named-block-nodes")
        names = [n["node-name"] for n in nodes
                 if n.get("drv") == "nbd" and f"socket={socket}" in str(n.get("file", ""))]
        if names:
            self._qmp("yank", {"instances": [{"type": "block-node", "node-name": n} for n in names]})
        return names

    def _qmp(self, command: str, arguments: dict | None = None):
        message = json.dumps({"execute": command, **({"arguments": arguments} if arguments else {})})
        with _translated(f"asking QEMU of {self.name} to {command}"):
            reply = json.loads(libvirt_qemu.qemuMonitorCommand(self._dom, message, 0))
        if "error" in reply:
            raise VirtError(f"QEMU of {self.name} refused {command}: {reply['error'].get('desc', reply['error'])}")
        return reply.get("return")

    def mirror_socket(self, target: str) -> str | None:
        """The NBD socket disk `target` is mirrored to, or None without a mirror."""
        root = ET.fromstring(self.xml())
        for disk in root.findall("./devices/disk"):
            if disk.find("target").get("dev") == target:
                host = disk.find("./mirror/source/host")
                return host.get("socket") if host is not None else None
        return None

    def create_checkpoint(self, name: str, disks: list[str], all_disks: list[str]) -> None:
        """A checkpoint (a dirty bitmap on each of `disks`) without a backup:
        what protection's folds record, so that a log backup after the
        mirror stopped takes every write since (rpofs.protect)."""
        cp = ET.Element("domaincheckpoint")
        ET.SubElement(cp, "name").text = name
        c_disks = ET.SubElement(cp, "disks")
        for target in all_disks:
            ET.SubElement(c_disks, "disk", name=target, checkpoint="bitmap" if target in disks else "no")
        with _translated(f"creating checkpoint {name} of {self.name}"):
            self._dom.checkpointCreateXML(ET.tostring(cp, encoding="unicode"), 0)

    def block_commit_active(self, target: str) -> None:
        """Start merging the disk's top image into its backing image while
        the guest runs (pivot() then switches to the backing image alone)."""
        with _translated(f"starting to merge disk {target} of {self.name}"):
            self._dom.blockCommit(target, None, None, 0, libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE)

    def block_job(self, target: str) -> BlockJob | None:
        """How far the disk's block job has come, or None without one."""
        with _translated(f"reading the block job of {self.name} disk {target}"):
            info = self._dom.blockJobInfo(target, 0)
        return BlockJob(info["cur"], info["end"]) if info else None

    def block_job_ready(self, target: str) -> bool:
        """Whether the copy may pivot: every byte copied and mirrored since."""
        with _translated(f"reading the block job of {self.name} disk {target}"):
            info = self._dom.blockJobInfo(target, 0)
            if not info or info["end"] == 0 or info["cur"] != info["end"]:
                return False
            root = ET.fromstring(self._dom.XMLDesc(0))
        for disk in root.findall("./devices/disk"):
            if disk.find("target").get("dev") == target:
                mirror = disk.find("mirror")
                return mirror is not None and mirror.get("ready") == "yes"
        return False

    def pivot(self, target: str) -> None:
        """Switch the disk to its copy, or after a commit to the image merged
        into (libvirt updates the persistent definition too)."""
        with _translated(f"switching disk {target} of {self.name} to its copy"):
            self._dom.blockJobAbort(target, libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)

    def cancel_block_job(self, target: str) -> bool:
        """End the disk's block job without switching; whether there was one."""
        try:
            if not self._dom.blockJobInfo(target, 0):
                return False
            self._dom.blockJobAbort(target, 0)
            return True
        except libvirt.libvirtError as e:
            if e.get_error_code() in (libvirt.VIR_ERR_OPERATION_INVALID, libvirt.VIR_ERR_NO_DOMAIN):
                return False
            raise VirtError(f"ending the block job of {self.name} disk {target}: {e.get_error_message()}") from e

    # -- the guest agent ---------------------------------------------------

    def freeze(self, mountpoints: tuple[str, ...], timeout_s: float) -> int:
        """Freeze guest filesystems (all, or these mountpoints); how many froze."""
        try:
            self._dom.agentSetResponseTimeout(max(1, round(timeout_s)), 0)
            return self._dom.fsFreeze(list(mountpoints) or None, 0)
        except libvirt.libvirtError as e:
            raise AgentUnavailable(f"cannot freeze the filesystems of {self.name}: {e.get_error_message()}") from e

    def thaw(self) -> int:
        """Thaw every frozen filesystem (libvirt's thaw takes no mountpoints)."""
        with _translated(f"thawing the filesystems of {self.name}"):
            return self._dom.fsThaw(None, 0)

    def guest_mountpoints(self) -> list[str]:
        """The guest's mounted filesystems (the agent's guest-get-fsinfo)."""
        try:
            return [mp for mp, _name, _fstype, _targets in self._dom.fsInfo(0)]
        except libvirt.libvirtError as e:
            raise AgentUnavailable(f"cannot ask {self.name}'s agent for its filesystems: "
                                   f"{e.get_error_message()}") from e

    def disks_of_mountpoint(self, mountpoint: str) -> list[str]:
        """The disk targets holding a guest mountpoint (the agent's guest-get-fsinfo)."""
        try:
            infos = self._dom.fsInfo(0)
        except libvirt.libvirtError as e:
            raise AgentUnavailable(f"cannot ask {self.name}'s agent where {mountpoint} is: "
                                   f"{e.get_error_message()}") from e
        for mp, _name, _fstype, targets in infos:
            if mp == mountpoint and targets:
                return list(targets)
        raise VirtError(f"{self.name} has no filesystem mounted at {mountpoint} on a disk libvirt knows")

    def guest_filesystems(self) -> list[GuestFilesystem]:
        """The guest's mounted filesystems (guest-get-fsinfo)."""
        try:
            return [GuestFilesystem(mp, name, fstype, tuple(targets)) for mp, name, fstype, targets in self._dom.fsInfo(0)]
        except libvirt.libvirtError as e:
            raise AgentUnavailable(f"cannot ask {self.name}'s agent for its filesystems: "
                                   f"{e.get_error_message()}") from e

    def agent(self, command: str, arguments: dict | None = None, timeout_s: int = 5):
        """One guest agent command; its "return" value. AgentUnavailable when
        the agent does not answer (absent, not started, hung, VM not running);
        AgentFileError when it answers with an error."""
        message = json.dumps({"execute": command} | ({"arguments": arguments} if arguments else {}))
        try:
            reply = libvirt_qemu.qemuAgentCommand(self._dom, message, timeout_s, 0)
        except libvirt.libvirtError as e:
            code = e.get_error_code()
            text = e.get_error_message() or str(e)
            # not answering, not connected yet, not configured (ARGUMENT_UNSUPPORTED), VM not running
            if code in (libvirt.VIR_ERR_AGENT_UNRESPONSIVE, libvirt.VIR_ERR_OPERATION_INVALID,
                        libvirt.VIR_ERR_AGENT_UNSYNCED, libvirt.VIR_ERR_NO_DOMAIN,
                        libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED, libvirt.VIR_ERR_OPERATION_TIMEOUT):
                raise AgentUnavailable(f"{self.name}'s guest agent does not answer: {text}") from e
            raise AgentFileError(f"{self.name}'s guest agent: {command}: {text}") from e
        return json.loads(reply)["return"]

    def agent_run(self, path: str, args: list[str], timeout_s: float = 10) -> str:
        """Run a program in the guest (guest-exec); its stdout. AgentFileError
        if it fails or runs longer than timeout_s."""
        pid = self.agent("guest-exec", {"path": path, "arg": args, "capture-output": True})["pid"]
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.agent("guest-exec-status", {"pid": pid})
            if status.get("exited"):
                break
            if time.monotonic() > deadline:
                raise AgentFileError(f"{path} in {self.name} still running after {timeout_s} s")
            time.sleep(0.02)
        if status.get("exitcode") != 0:
            err = base64.b64decode(status.get("err-data", "")).decode(errors="replace").strip()
            raise AgentFileError(f"{path} in {self.name} exited {status.get('exitcode')}: {err}")
        return base64.b64decode(status.get("out-data", "")).decode(errors="replace")

    # -- checkpoints -------------------------------------------------------

    def checkpoints(self) -> list[str]:
        """Names of rpofs's checkpoints, oldest first."""
        with _translated(f"listing checkpoints of {self.name}"):
            cps = self._dom.listAllCheckpoints(libvirt.VIR_DOMAIN_CHECKPOINT_LIST_TOPOLOGICAL)
        return [c.getName() for c in cps if c.getName().startswith(CHECKPOINT_PREFIX)]

    def checkpoint_xml(self, name: str) -> str:
        with _translated(f"reading checkpoint {name} of {self.name}"):
            return self._dom.checkpointLookupByName(name).getXMLDesc(0)

    def redefine_checkpoint(self, xml: str) -> None:
        """Give libvirt back a checkpoint's metadata; it checks that the
        bitmaps in the images are there and usable. The checkpoint comes back
        as a root: its parent, deleted after it was made, is not needed."""
        cp = ET.fromstring(xml)
        for parent in cp.findall("parent"):
            cp.remove(parent)
        flags = (libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE
                 | libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE_VALIDATE)
        with _translated(f"redefining a checkpoint of {self.name}"):
            self._dom.checkpointCreateXML(ET.tostring(cp, encoding="unicode"), flags)

    def delete_checkpoint(self, name: str) -> None:
        """Delete one checkpoint; libvirt merges its bitmap into its parent's,
        so the changes it tracked stay tracked. A checkpoint whose bitmap is
        already gone (QEMU crashed) loses its metadata only."""
        with _translated(f"deleting checkpoint {name} of {self.name}"):
            try:
                cp = self._dom.checkpointLookupByName(name)
            except libvirt.libvirtError as e:
                if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT:
                    return
                raise
            try:
                cp.delete(0)
            except libvirt.libvirtError as e:
                log.warning("%s: checkpoint %s: %s; deleting its metadata only", self.name, name,
                            e.get_error_message())
                cp.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)

    # -- backup jobs -------------------------------------------------------

    def begin_pull_backup(self, disks: list[str], all_disks: list[str], socket: str, scratch_dir: str,
                          checkpoint: str, incremental: str | None) -> dict[str, tuple[str, str | None]]:
        """Start a pull-mode backup of `disks` exported over NBD at `socket`,
        creating `checkpoint`. Returns target -> (export name, dirty bitmap
        name or None)."""
        backup = ET.Element("domainbackup", mode="pull")
        if incremental:
            ET.SubElement(backup, "incremental").text = incremental
        ET.SubElement(backup, "server", transport="unix", socket=socket)
        cp = ET.Element("domaincheckpoint")
        ET.SubElement(cp, "name").text = checkpoint
        b_disks, c_disks = ET.SubElement(backup, "disks"), ET.SubElement(cp, "disks")
        for target in all_disks:
            chosen = target in disks
            d = ET.SubElement(b_disks, "disk", name=target, backup="yes" if chosen else "no")
            if chosen:
                d.set("type", "file")
                ET.SubElement(d, "scratch", file=os.path.join(scratch_dir, f"{self.uuid}-{target}.scratch"))
            ET.SubElement(c_disks, "disk", name=target, checkpoint="bitmap" if chosen else "no")
        with _translated(f"starting the backup job of {self.name}"):
            self._dom.backupBegin(ET.tostring(backup, encoding="unicode"), ET.tostring(cp, encoding="unicode"), 0)
        with _translated(f"reading the backup job of {self.name}"):
            job = ET.fromstring(self._dom.backupGetXMLDesc(0))
        exports = {}
        for d in job.findall("./disks/disk[@backup='yes']"):
            exports[d.get("name")] = (d.get("exportname") or d.get("name"), d.get("exportbitmap"))
        return exports

    def backup_job_socket(self) -> str | None:
        """The NBD socket of the domain's running backup job, or None."""
        try:
            if self._dom.jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE:
                return None
            server = ET.fromstring(self._dom.backupGetXMLDesc(0)).find("server")
        except libvirt.libvirtError:
            return None  # no backup job (another kind of job, or none any more)
        return server.get("socket") if server is not None else None

    def end_job(self) -> None:
        """End the domain's backup job, if any. Safe to call on every path."""
        try:
            self._dom.abortJob()
        except libvirt.libvirtError as e:
            if e.get_error_code() not in (libvirt.VIR_ERR_OPERATION_INVALID, libvirt.VIR_ERR_NO_DOMAIN):
                raise VirtError(f"ending the backup job of {self.name}: {e.get_error_message()}") from e
