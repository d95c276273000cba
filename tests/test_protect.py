"""Real level: continuous protection (rpofs.protect, docs/PROTECT.md) of
VMs without an OS, written through QEMU's device (HMP qemu-io: the write
goes through the mirror as a guest's does). A write's issue and its
acknowledgement are timed on the host around the monitor call, so an
instant T must show exactly the first k writes with every write acked
before T in and none issued after T out."""

import contextlib
import json
import os
import random
import subprocess
import threading
import time

import libvirt
import pytest

from vmlab import TestVM, WriteLog, make_qcow2, mounted, points_json, run_rpofs, seeded_content, wait_for

from rpofs.store import journal, protection
from rpofs.store.repo import Repository
from rpofs.store.materialize import DiskReader
from rpofs.timefmt import format_time, parse_as_of

pytestmark = pytest.mark.libvirt

SIZES = (8 << 20, 3 << 20)


def _vm(tmp_path, name, persistent=False):
    contents = [seeded_content(size, seed) for seed, size in enumerate(SIZES)]
    disks = []
    for i, content in enumerate(contents):
        path = str(tmp_path / f"disk{i}.qcow2")
        make_qcow2(path, bytes(content))
        disks.append((path, "qcow2"))
    return TestVM(name, disks, persistent=persistent), contents


def _writes(log: WriteLog, vms, rnd: random.Random, n: int, pause_s: float = 0.0) -> None:
    for i in range(n):
        disk = rnd.randrange(len(SIZES))
        length = rnd.choice((512, 4096, 65536, 65536 + 512, 200 * 1024))
        offset = rnd.randrange(0, SIZES[disk] - length) // 512 * 512
        log.write(vms, 0, disk, offset, length, None if rnd.random() < 0.1 else rnd.randrange(1, 256))
        if pause_s:
            time.sleep(pause_s)


def _read_disks(root, names) -> list[bytes]:
    out = []
    for target in ("vda", "vdb"):
        with open(os.path.join(root, f"{target}.raw"), "rb") as f:
            out.append(f.read())
    return out


def _stop_servers(repo, uuid: str) -> None:
    """A failed test's journal servers (they outlive everything else, by design)."""
    from rpofs.protect import protector
    if not os.path.exists(os.path.join(str(repo), "catalog")):
        return
    for s in _session_count(repo, uuid):
        if protector.server_alive(s.server_pid, journal.journal_dir(str(repo), s)):
            protector.stop_server(s.server_pid)


def _newest_disks(repo, uuid: str) -> list[bytes]:
    """The disks of the VM's newest point, read from the repository."""
    r = Repository.open(str(repo))
    try:
        last = r.points(uuid)[-1]
        return [bytes(DiskReader(r, last, t).read(0, s)) for t, s in zip(("vda", "vdb"), SIZES)]
    finally:
        r.close()


def _k_of(log: WriteLog, disks: list[bytes], ks: range) -> int | None:
    """The k in ks whose state the disks hold, or None."""
    for k in ks:
        if [bytes(d) for d in log.state(0, k)] == disks:
            return k
    return None


def test_every_instant_holds_exactly_the_writes_acknowledged_before_it(tmp_path):
    repo = tmp_path / "repo"
    run_rpofs("init", repo=repo)
    vm, contents = _vm(tmp_path, f"rpofs-pt-{os.getpid()}")
    log = WriteLog([contents])
    rnd = random.Random(12)
    try:
        out = json.loads(run_rpofs("protect", vm.name, "--json", repo=repo).stdout)
        assert out["state"] == "protected" and out["ready_us"] > 0
        _writes(log, [vm], rnd, 40, pause_s=0.003)
        refused = run_rpofs("backup", vm.name, repo=repo, check=False)
        assert refused.returncode == 1 and "protected continuously" in refused.stderr
        assert refused.stderr.count("\n") == 1
        refused = run_rpofs("protect", vm.name, "--disk", "vda", repo=repo, check=False)
        assert refused.returncode == 1 and "protected already, its disks vda, vdb" in refused.stderr
        refused = run_rpofs("protect", "no-such-vm", repo=repo, check=False)
        assert refused.returncode == 1 and refused.stderr.count("\n") == 1
        run_rpofs("protect", vm.name, repo=repo)       # folds what the journal holds
        _writes(log, [vm], rnd, 40, pause_s=0.003)
        points = points_json(repo, vm.name)
        assert [p["kind"] for p in points] == ["full", "log"] and {p["origin"] for p in points} == {"journal"}
        with mounted(repo, tmp_path / "mnt") as mnt:
            vmdir = mnt / vm.name
            # the full is the disks as the mirror's first pass left them: before any write
            assert _read_disks(vmdir / points[0]["name"], None) == [bytes(c) for c in contents]
            # instants between the writes, around them, and at each write's own ack
            times = [w[5] for w in log.writes] + [w[6] for w in log.writes]
            times += [rnd.uniform(log.writes[0][5], log.writes[-1][6]) for _ in range(20)]
            checked = set()
            for t in sorted(times):
                text = format_time(int(t * 1e6), 6)
                link = os.readlink(vmdir / "at" / text)
                ks = log.candidates(int(t * 1e6) / 1e6, 0.0)
                k = _k_of(log, _read_disks(vmdir / "at" / text, None), ks)
                assert k is not None, f"at/{text} -> {link}: not the state after any of writes {ks}"
                checked.add(link)
            assert len(checked) > 20
            listed = [n for n in os.listdir(vmdir) if n.endswith("Z") and len(n) == 27]
            assert listed, "no journal instant is listed"
            meta = json.loads((vmdir / listed[0] / "point.json").read_text())
            assert meta["kind"] == "journal" and meta["base"]["name"] in {p["name"] for p in points}
            # newest: everything
            latest = os.readlink(vmdir / "latest")
            assert _read_disks(vmdir / latest, None) == [bytes(d) for d in log.state(0, len(log.writes))]
        ended = json.loads(run_rpofs("unprotect", vm.name, "--json", repo=repo).stdout)
        assert ended["state"] == "ended" and ended["last_us"] >= int(log.writes[-1][5] * 1e6)
        # the last fold holds every write; a backup after extends it from its checkpoint
        _writes(log, [vm], rnd, 5)
        run_rpofs("backup", vm.name, repo=repo)
        points = points_json(repo, vm.name)
        assert points[-1]["kind"] == "log" and points[-1]["origin"] == "backup"
        assert _newest_disks(repo, vm.uuid) == [bytes(d) for d in log.state(0, len(log.writes))]
    finally:
        vm.destroy()
        _stop_servers(repo, vm.uuid)


def _restart_libvirtd() -> None:
    with open("/var/run/libvirtd.pid") as f:
        libvirtd = int(f.read())
    os.kill(libvirtd, 15)
    wait_for(lambda: not os.path.exists(f"/proc/{libvirtd}"), timeout=30, what="libvirtd to stop")
    with open("/var/log/libvirt/libvirtd.log", "ab") as out:  # never a pipe: SIGPIPE would kill it
        subprocess.run(["libvirtd", "-d"], stdin=subprocess.DEVNULL, stdout=out, stderr=out, check=True)
    wait_for(lambda: subprocess.run(["virsh", "-c", "qemu:///system", "version"],
                                    capture_output=True).returncode == 0, timeout=30, what="libvirtd")


def _status(repo) -> dict:
    vms = json.loads(run_rpofs("status", "--json", repo=repo).stdout)["vms"]
    return vms[0] if vms else {}


def _session_count(repo, uuid) -> list:
    from rpofs.store import crypto
    r = Repository.open(str(repo), keys=crypto.Passphrase(lambda: os.environ.get("RPOFS_PASSPHRASE")))
    try:
        return protection.of_vm(r, uuid)
    finally:
        r.close()


def test_the_ingester_keeps_protection_through_a_daemon_kill_and_a_server_kill(tmp_path):
    """continuous = true: protected, folded every journal_fold; the daemon
    killed with -9 and started again takes the same session over (nothing
    folded twice), and so after libvirtd restarted; the journal server killed: the guest runs on, a backup
    at once takes what the journal missed, protection comes back in a new
    session. Every point and a sample of instants hold exactly a prefix of
    the writes their time allows, and nothing acknowledged is lost."""
    from test_ingest_daemon import Writer, start_daemon
    import test_ingest_daemon
    vm, contents = _vm(tmp_path, f"rpofs-ptd-{os.getpid()}")
    test_ingest_daemon.SIZE = min(SIZES)   # the Writer's offsets stay on both disks
    log = WriteLog([contents])
    repo, config, log_path = tmp_path / "repo", tmp_path / "rpofs.toml", tmp_path / "ingest.log"
    run_rpofs("init", repo=repo)
    config.write_text(f'[ingest]\nvms = ["{vm.name}"]\n[vm.{vm.name}]\ncontinuous = true\njournal_fold = "2s"\n'
                      f'keep_journal_within = "1h"\nlog_interval = "1s"\nfull_interval = "1h"\n')
    writer = Writer([vm], log, seed=3)
    daemon = start_daemon(repo, config, log_path)
    try:
        _run_the_ingester_test(vm, log, repo, config, log_path, writer, daemon, tmp_path)
    finally:
        vm.destroy()
        _stop_servers(repo, vm.uuid)


def _run_the_ingester_test(vm, log, repo, config, log_path, writer, daemon, tmp_path):
    from test_ingest_daemon import SLACK_S, Writer, check_every_point, start_daemon
    try:
        wait_for(lambda: (_status(repo).get("protection") or {}).get("state") == "protected", timeout=60,
                 what="protection")
        writer.start()
        wait_for(lambda: sum(p["origin"] == "journal" for p in points_json(repo, vm.name)) >= 3, timeout=60,
                 what="three folds")
        first = _session_count(repo, vm.uuid)
        assert len(first) == 1 and first[0].state == "protected"
        daemon.kill()
        daemon.wait()
        time.sleep(1.0)   # writes go on, journaled by the server the daemon left running
        daemon = start_daemon(repo, config, log_path)
        before = len(points_json(repo, vm.name))
        wait_for(lambda: len(points_json(repo, vm.name)) >= before + 2, timeout=60, what="folds after the restart")
        again = _session_count(repo, vm.uuid)
        assert [s.started_us for s in again] == [first[0].started_us] and again[0].state == "protected"
        # libvirtd restarted: the mirror job lives in QEMU, libvirt finds it again, so does the daemon
        writer.stop.set()
        writer.join()
        assert writer.error is None, writer.error
        _restart_libvirtd()
        vm.conn.close()
        vm.conn = libvirt.open("qemu:///system")
        vm.dom = vm.conn.lookupByUUIDString(vm.uuid)
        writer = Writer([vm], log, seed=4)
        writer.start()
        before = len(points_json(repo, vm.name))
        wait_for(lambda: len(points_json(repo, vm.name)) >= before + 2, timeout=60,
                 what="folds after libvirtd came back")
        again = _session_count(repo, vm.uuid)
        assert [s.started_us for s in again] == [first[0].started_us] and again[0].state == "protected"
        os.kill(again[0].server_pid, 9)
        writes = len(log.writes)
        wait_for(lambda: len(log.writes) >= writes + 10, timeout=30, what="the guest to write on")
        wait_for(lambda: any(p["origin"] == "backup" for p in points_json(repo, vm.name)), timeout=60,
                 what="the backup after the server died")
        wait_for(lambda: len(_session_count(repo, vm.uuid)) == 2
                 and _session_count(repo, vm.uuid)[-1].state == "protected", timeout=90,
                 what="protection again")
        # the daemon's status file is written every second: it follows the catalog
        wait_for(lambda: _status(repo)["protection"]["state"] == "protected", timeout=10, what="status")
        assert _status(repo)["rpo_seconds"] == 0.0
        assert "journal server" in _session_count(repo, vm.uuid)[0].reason
        time.sleep(2.5)
        writer.stop.set()
        writer.join()
        assert writer.error is None, writer.error
    finally:
        writer.stop.set()
        daemon.terminate()
        daemon.wait(timeout=60)
    # the checks after the daemon stopped
    run_rpofs("unprotect", vm.name, repo=repo)
    points = points_json(repo, vm.name)
    spans = [(p["stats"]["journal"]["from_us"], p["stats"]["journal"]["to_us"]) for p in points
             if p["origin"] == "journal" and p["kind"] == "log"]
    for (_, a_to), (b_from, _) in zip(spans, spans[1:]):
        assert b_from >= a_to, f"folds overlap: {spans}"
    with mounted(repo, tmp_path / "mnt") as mnt:
        check_every_point(repo, mnt, [vm], log)
        newest = points[-1]
        disks = _read_disks(mnt / vm.name / newest["name"], None)
        assert disks == [bytes(d) for d in log.state(0, len(log.writes))], "the last point lost writes"
        vmdir = mnt / vm.name
        rnd = random.Random(5)
        for _ in range(15):
            t = rnd.uniform(log.writes[0][5], log.writes[-1][6])
            k = _k_of(log, _read_disks(vmdir / "at" / format_time(int(t * 1e6), 6), None),
                      log.candidates(t, SLACK_S))
            assert k is not None, f"at/{format_time(int(t * 1e6), 6)} holds no prefix of the writes"


class _Writes:
    """Writes through the device, each logged before it is issued (its
    t_end None until QEMU completed it), until stopped or QEMU dies."""

    def __init__(self, vm: TestVM, base: list[bytes], seed: int):
        self.vm, self.base, self.rnd = vm, [bytearray(b) for b in base], random.Random(seed)
        self.writes = []   # [disk, offset, length, pattern, t_start, t_end or None]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop.is_set():
            disk = self.rnd.randrange(len(SIZES))
            length = self.rnd.choice((512, 4096, 65536 + 512))
            offset = self.rnd.randrange(0, SIZES[disk] - length) // 512 * 512
            w = [disk, offset, length, self.rnd.randrange(1, 256), time.time(), None]
            self.writes.append(w)
            try:
                self.vm.write(disk, offset, length, w[3])
            except Exception:  # QEMU was killed: this one may or may not have reached the disk
                return
            w[5] = time.time()

    def state(self, k: int) -> list[bytes]:
        disks = [bytearray(d) for d in self.base]
        for disk, offset, length, pattern, _, _ in self.writes[:k]:
            disks[disk][offset:offset + length] = bytes([pattern]) * length
        return [bytes(d) for d in disks]

    def bounds(self, t: float) -> range:
        """k for an instant t: every write completed before t, none issued after."""
        return range(sum(1 for w in self.writes if w[5] is not None and w[5] < t),
                     sum(1 for w in self.writes if w[4] < t) + 1)


def _qcow2_bytes(path: str) -> bytes:
    raw = path + ".check.raw"
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", path, raw], check=True)
    try:
        with open(raw, "rb") as f:
            return f.read()
    finally:
        os.unlink(raw)


def test_qemu_killed_at_random_moments_loses_no_acknowledged_write(tmp_path):
    """Three times: protected, writing, QEMU killed with -9 at a random
    moment. The session's last point holds every write QEMU completed
    (and at most the one in flight), and every instant of the session
    exactly the writes its time allows."""
    repo = tmp_path / "repo"
    run_rpofs("init", repo=repo)
    vm, contents = _vm(tmp_path, f"rpofs-ptk-{os.getpid()}", persistent=True)
    base = [bytes(c) for c in contents]
    rnd = random.Random(7)
    try:
        for round_ in range(3):
            if round_:
                vm.dom.create()
            run_rpofs("protect", vm.name, repo=repo)
            full = points_json(repo, vm.name)[-1]
            assert full["kind"] == "full" and full["origin"] == "journal"
            with mounted(repo, tmp_path / "mnt") as mnt:
                first_pass = _read_disks(mnt / vm.name / full["name"], None)
            if first_pass != base:
                diffs = [(i, sum(1 for a, b in zip(x, y) if a != b)) for i, (x, y) in enumerate(zip(first_pass, base))]
                raise AssertionError(f"round {round_}: the full differs from the images: {diffs}")
            w = _Writes(vm, base, seed=round_)
            w.thread.start()
            time.sleep(rnd.uniform(1.0, 2.5))
            vm.kill_qemu()
            w.thread.join(timeout=30)
            done = sum(1 for x in w.writes if x[5] is not None)
            assert done > 10, "too few writes before the kill to prove anything"  # ~5 ms each here
            if round_ == 0:
                _the_claim_ends_with_the_vm(repo, vm)
            ended = json.loads(run_rpofs("unprotect", vm.name, "--json", repo=repo).stdout)
            assert ended["state"] == "ended"
            newest = points_json(repo, vm.name)[-1]
            assert newest["origin"] == "journal"
            with mounted(repo, tmp_path / "mnt") as mnt:
                vmdir = mnt / vm.name
                got = _read_disks(vmdir / newest["name"], None)
                assert got in (w.state(done), w.state(len(w.writes))), \
                    f"round {round_}: the last point is not every completed write ({done})"
                for _ in range(12):
                    t = rnd.uniform(w.writes[0][4], w.writes[done - 1][5])
                    text = format_time(int(t * 1e6), 6)
                    disks = _read_disks(vmdir / "at" / text, None)
                    assert any(disks == w.state(k) for k in w.bounds(t)), f"round {round_}: at/{text}"
            # What QEMU left in the images is where the next round starts. Not
            # every completed write need be there: the guest never flushed, and
            # QEMU (cache=writeback) keeps qcow2 metadata in memory until a
            # flush. The journal has each one durable before it completed.
            base = [_qcow2_bytes(path) for path, _ in vm.disks]
        done_sessions = _session_count(repo, vm.uuid)
        assert len(done_sessions) == 3
        assert run_rpofs("verify", "--read-data", repo=repo, check=False).returncode == 0
        # a flipped byte in an ended session's journal: verify names it, the
        # journal's instants stop before it (never wrong bytes)
        first = done_sessions[0]
        path = journal.segments(journal.journal_dir(str(repo), first))[0]   # (beside it: the logs of its processes)
        with open(path, "r+b") as f:
            f.seek(os.path.getsize(path) // 2)
            byte = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([byte[0] ^ 0x40]))
        result = run_rpofs("verify", "--read-data", repo=repo, check=False)
        assert result.returncode != 0 and "journal" in result.stdout + result.stderr, result.stdout
        with mounted(repo, tmp_path / "mnt") as mnt:
            names = [n for n in os.listdir(mnt / vm.name) if len(n) == 27]
            times = sorted(int(parse_as_of(n)) for n in names)
            assert not [t for t in times if first.ready_us < t <= first.last_us and t > _first_bad(path)]
    finally:
        vm.destroy()
        _stop_servers(repo, vm.uuid)


def _the_claim_ends_with_the_vm(repo, vm) -> None:
    """Protected by hand, no ingester: once QEMU is gone its journal server
    ends by itself (no mirror comes back), and status stops saying
    "protected" with an RPO of 0."""
    from rpofs.protect import protector
    session = _session_count(repo, vm.uuid)[-1]
    directory = journal.journal_dir(str(repo), session)
    wait_for(lambda: not protector.server_alive(session.server_pid, directory), timeout=60,
             what="the journal server to end after its VM")
    shown = json.loads(run_rpofs("status", "--json", repo=repo).stdout)
    row = next(v for v in shown["vms"] if v["uuid"] == vm.uuid)
    assert row["protection"]["state"] == "lost" and "rpofs protect" in row["protection"]["reason"]
    assert row["rpo_seconds"] > 0


def _first_bad(path: str) -> int:
    """The time of the newest record a scan still verifies."""
    found = journal.scan(path).records
    return found[-1].time_us if found else 0


def test_a_full_repository_fails_the_mirror_not_the_guest(tmp_path):
    """The repository on a small tmpfs fills while the guest writes: the
    journal server answers ENOSPC, QEMU fails the mirror and the guest
    writes on. Once there is room again, a backup extends the last fold
    from its checkpoint and holds every write."""
    tmpfs = tmp_path / "small"
    tmpfs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(tmpfs)], check=True)
    vm = None
    try:
        repo = tmpfs / "repo"
        run_rpofs("init", repo=repo)
        vm, contents = _vm(tmp_path, f"rpofs-ptf-{os.getpid()}")
        run_rpofs("protect", vm.name, repo=repo)
        log = WriteLog([contents])
        rnd = random.Random(9)
        server_pid = _session_count(repo, vm.uuid)[-1].server_pid
        for i in range(4000):  # until the journal cannot take more, and well after
            offset = rnd.randrange(0, SIZES[0] - 65536) // 512 * 512
            log.write([vm], 0, 0, offset, 65536, 1 + i % 250)
            if not os.path.exists(f"/proc/{server_pid}"):
                break
        else:
            raise AssertionError("the journal never filled the repository's filesystem")
        for i in range(20):  # the guest runs on, its writes complete
            log.write([vm], 0, 1, i * 4096, 4096, 200)
        # (the server's own log is in the full filesystem too: it could not say why it stopped)
        ended = json.loads(run_rpofs("unprotect", vm.name, "--json", repo=repo).stdout)
        assert ended["state"] == "ended"
        subprocess.run(["mount", "-o", "remount,size=256m", str(tmpfs)], check=True)
        run_rpofs("backup", vm.name, repo=repo)
        newest = points_json(repo, vm.name)[-1]
        assert newest["origin"] == "backup" and newest["kind"] == "log"
        assert _newest_disks(repo, vm.uuid) == [bytes(d) for d in log.state(0, len(log.writes))], "a write acknowledged to the guest was lost"
        verify = run_rpofs("verify", repo=repo, check=False)
        assert verify.returncode == 0, verify.stdout + verify.stderr
    finally:
        if vm is not None:
            vm.destroy()
            _stop_servers(tmpfs / "repo", vm.uuid)
        subprocess.run(["umount", "-l", str(tmpfs)], check=False)


def test_every_command_takes_a_journal_instant_as_at_does(tmp_path):
    """At a time that names a journal instant newer than any fold, at/ in
    the mount, `cp`, `restore`, `restore --vm` and `run` give the same
    bytes (the disk as the guest's acknowledged writes left it then): no
    command answers with the older fold. The journal's retention keeps the
    records a VM run at the instant reads, until it no longer does."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "log.txt").write_bytes(b"A" * 65536)
    raw = tmp_path / "fs.raw"
    with open(raw, "wb") as f:
        f.truncate(16 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-d", str(src), str(raw)], check=True)
    bmap = subprocess.run(["debugfs", "-R", "bmap /log.txt 0", str(raw)], capture_output=True, text=True, check=True)
    offset = int(bmap.stdout.split()[0]) * 4096  # the file's first block on the disk
    base = raw.read_bytes()
    disk = tmp_path / "fs.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(disk)], check=True)
    repo = tmp_path / "repo"
    run_rpofs("init", repo=repo)
    vm = TestVM(f"rpofs-pti-{os.getpid()}", [(str(disk), "qcow2")])
    restored = f"rpofs-pti-restored-{os.getpid()}"
    try:
        run_rpofs("protect", vm.name, repo=repo)
        vm.write(0, offset, 4096, ord("B"))
        instant = time.time()
        while time.time() <= instant + 0.002:  # the next write is issued after the instant
            pass
        vm.write(0, offset + 4096, 4096, ord("C"))
        text = format_time(int(instant * 1e6), 6)
        want_disk = bytearray(base)
        want_disk[offset:offset + 4096] = b"B" * 4096
        want_file = b"B" * 4096 + b"A" * 61440
        assert [p["origin"] for p in points_json(repo, vm.name)] == ["journal"]  # only the first pass's fold
        with mounted(repo, tmp_path / "mnt") as mnt:
            at = mnt / vm.name / "at" / text
            assert (at / "point.json").exists() and json.loads((at / "point.json").read_text())["kind"] == "journal"
            assert (at / "vda.raw").read_bytes() == want_disk
            assert (at / "files" / "vda" / "0" / "log.txt").read_bytes() == want_file
        run_rpofs("cp", f"{vm.name}@{text}:vda/0/log.txt", tmp_path / "cp.txt", repo=repo)
        assert (tmp_path / "cp.txt").read_bytes() == want_file
        out = run_rpofs("restore", f"{vm.name}@{text}:vda", tmp_path / "vda.raw", repo=repo)
        assert (tmp_path / "vda.raw").read_bytes() == want_disk and "journal instant" in out.stderr
        (tmp_path / "vmdir").mkdir()
        run_rpofs("restore", f"{vm.name}@{text}", "--vm", "--name", restored, "--dir", tmp_path / "vmdir",
                  "--format", "raw", repo=repo)
        assert (tmp_path / "vmdir" / f"{restored}-vda.raw").read_bytes() == want_disk
        runner = f"rpofs-pti-run-{os.getpid()}"
        run_rpofs("run", f"{vm.name}@{text}", "--name", runner, "--no-network", repo=repo)
        [ran] = [r for r in json.loads(run_rpofs("run", "--list", "--json", repo=repo).stdout) if r["name"] == runner]
        # the instant at/<text> names: the newest write's at or before it
        assert parse_as_of(ran["time"]) <= parse_as_of(text) and ran["state"] == "running"
        overlay = next(f for f in ran["files"] if f.endswith("-vda.qcow2"))
        info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output", "json", overlay], capture_output=True,
                                         text=True, check=True).stdout)
        assert info["backing-filename"].endswith(f"/at/{ran['time']}/vda.raw"), info["backing-filename"]

        def overlay_reads() -> bytes:
            subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", overlay, str(tmp_path / "run.raw")], check=True)
            return (tmp_path / "run.raw").read_bytes()
        assert overlay_reads() == want_disk
        # the session ends (its journal folded past the instant); retention keeps what the VM reads
        run_rpofs("unprotect", vm.name, repo=repo)
        from rpofs.protect import protector
        with Repository.open(str(repo)) as r:
            [session] = protection.of_vm(r, vm.uuid)
            protector.drop_journal(r, session, 0)
            assert journal.segments(journal.journal_dir(str(repo), session))
        assert overlay_reads() == want_disk
        run_rpofs("run", "--move", runner, "--dir", tmp_path, repo=repo)
        moved = tmp_path / f"{runner}-vda.raw"
        subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", str(tmp_path / f"{runner}-vda.qcow2"),
                        str(moved)], check=True)
        assert moved.read_bytes() == want_disk
        with Repository.open(str(repo)) as r:  # nothing reads the instant now: its records may go
            protector.drop_journal(r, session, 0)
            assert not journal.segments(journal.journal_dir(str(repo), session))
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            vm.conn.lookupByName(restored).undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
        run_rpofs("run", "--stop", f"rpofs-pti-run-{os.getpid()}", repo=repo, check=False)
        with contextlib.suppress(libvirt.libvirtError):   # moved off the mount: an ordinary domain now
            moved_vm = vm.conn.lookupByName(f"rpofs-pti-run-{os.getpid()}")
            with contextlib.suppress(libvirt.libvirtError):
                moved_vm.destroy()
            moved_vm.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
        vm.destroy()
        _stop_servers(repo, vm.uuid)


def test_an_encrypted_repository_is_protected_with_its_journal_sealed(tmp_path, monkeypatch):
    """An encrypted repository's VM protected by `rpofs protect`: the server
    gets the key through a pipe, its journal holds no plaintext, and the
    instants (through the mount, with the passphrase) and the folds read
    back exactly the guest's writes."""
    monkeypatch.setenv("RPOFS_PASSPHRASE", "protect me")
    size = 8 << 20
    content = seeded_content(size, 71)
    disk = tmp_path / "d.qcow2"
    make_qcow2(str(disk), bytes(content))
    repo = tmp_path / "repo"
    run_rpofs("init", "--encrypt", repo=repo)
    vm = TestVM(f"rpofs-pte-{os.getpid()}", [(str(disk), "qcow2")])
    try:
        run_rpofs("protect", vm.name, repo=repo)
        vm.write(0, 1 << 20, 65536, 0x5A)
        first = bytearray(content)
        first[1 << 20:(1 << 20) + 65536] = b"\x5a" * 65536
        instant = time.time()
        while time.time() <= instant + 0.002:  # the next write is issued after the instant
            pass
        vm.write(0, 3 << 20, 65536, 0x6B)
        second = bytearray(first)
        second[3 << 20:(3 << 20) + 65536] = b"\x6b" * 65536
        text = format_time(int(instant * 1e6), 6)
        with mounted(repo, tmp_path / "mnt") as mnt:
            assert (mnt / vm.name / "at" / text / "vda.raw").read_bytes() == first
        run_rpofs("unprotect", vm.name, repo=repo)
        out = tmp_path / "vda.raw"
        run_rpofs("restore", f"{vm.name}@latest:vda", out, repo=repo)
        assert out.read_bytes() == second
        segs = [p for p in (repo / "journal").rglob("seg-*.jnl")]
        assert segs and sum(p.stat().st_size for p in segs) > 2 * 65536
        for p in segs:
            body = p.read_bytes()
            assert b"\x5a" * 4096 not in body and b"\x6b" * 4096 not in body, p
    finally:
        vm.destroy()
        _stop_servers(repo, vm.uuid)
