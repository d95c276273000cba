"""Listing a VM's points by time: `rpofs points --since/--until/--limit`
and Repository.named_points, checked against the whole list filtered (the
same points, the same names, also for points that share a second)."""

import json
import random
import subprocess
import sys

import pytest

from rpofs.store.repo import Repository
from rpofs.store.schema import BLOCK_SIZE
from rpofs.timefmt import US, format_time, point_names
from synth import T0, VM, back_up, write

pytestmark = pytest.mark.lmdb


@pytest.fixture(scope="module")
def history(tmp_path_factory):
    """40 points: a full, then logs; some seconds hold several points."""
    path = tmp_path_factory.mktemp("pts") / "repo"
    repo = Repository.init(str(path))
    rnd = random.Random(3)
    disk = bytearray(4 * BLOCK_SIZE)
    t, last = T0, None
    for i in range(40):
        dirty = set()
        write(disk, dirty, rnd.randrange(len(disk) - 10), rnd.randbytes(10))
        last = back_up(repo, [disk], [dirty] if last else [set()], "log" if last else "full", last, t)
        t += rnd.choice([1, 250_000, 700_000, US, 3 * US])   # several in one second, now and then
    repo.close()
    return path


def whole(repo: Repository) -> list[tuple[str, int]]:
    points = repo.points(VM)
    return list(zip(point_names([p.time_us for p in points], [p.name for p in points]), [p.time_us for p in points]))


def test_named_points_are_the_whole_list_filtered(history):
    rnd = random.Random(5)
    with Repository.open(str(history)) as repo:
        every = whole(repo)
        times = [t for _, t in every]
        for _ in range(200):
            since = rnd.choice([0, rnd.choice(times), rnd.choice(times) + rnd.randrange(-US, US)])
            until = rnd.choice([None, rnd.choice(times), rnd.choice(times) + rnd.randrange(-US, US)])
            newest = rnd.choice([None, 1, 2, 5, 100])
            want = [(n, t) for n, t in every if since <= t and (until is None or t <= until)]
            want = want[-newest:] if newest else want
            got = [(n, p.time_us) for n, p in repo.named_points(VM, since, until, newest)]
            assert got == want, (since, until, newest)


def rpofs(*args, repo):
    return subprocess.run([sys.executable, "-m", "rpofs.cli", "--repo", str(repo), *args], capture_output=True,
                          text=True, timeout=120)


def test_points_since_until_limit_from_the_command_line(history):
    with Repository.open(str(history)) as repo:
        every = whole(repo)
    since, until = every[5][1], every[30][1]
    done = rpofs("points", "m", "--json", "--since", format_time(since, 6), "--until", format_time(until, 6),
                 "--limit", "7", repo=history)
    assert done.returncode == 0, done.stderr
    assert [p["name"] for p in json.loads(done.stdout)] == [n for n, _ in every[24:31]]
    done = rpofs("points", "m", "--limit", "3", repo=history)
    assert [line.split()[0] for line in done.stdout.splitlines()] == [n for n, _ in every[-3:]]
    for bad, what in ((["--limit", "0"], "--limit must be"), (["--since", "yesterday-ish"], "yesterday-ish")):
        done = rpofs("points", "m", *bad, repo=history)
        assert done.returncode == 1 and what in done.stderr and done.stderr.count("\n") == 1, done.stderr
