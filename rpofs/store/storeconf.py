"""REPO/store.json: where a repository's packs are when they are in an
object store, and which host's they are. Read without the S3 library, so
that opening a local repository never imports it.

    {"store": "s3://BUCKET/PREFIX", "cache_size": BYTES,
     "host": NAME,              the host whose catalog this is
     "instance": HEX,           this machine's claim on that host (its lease);
                                absent in a replica
     "replica": true,           a copy of another host's catalog that this
                                machine follows and never writes
     "cache": PATH,             the cache directory (default REPO/cache; a
                                replica shares its repository's)
     "grace": SECONDS}          how long a condemned chunk waits before it may
                                be deleted (rpofs.store.lending; default 3600)
"""

import dataclasses
import json
import os

from ..durable import read_json, write_file
from ..errors import RpofsError

NAME = "store.json"


@dataclasses.dataclass(frozen=True)
class StoreConf:
    store: str
    cache_size: int
    host: str = ""
    instance: str = ""
    replica: bool = False
    cache: str = ""
    grace: float = 3600.0

    def cache_dir(self, repo_path: str) -> str:
        return os.path.join(repo_path, self.cache or "cache")


def read(repo_path: str) -> StoreConf | None:
    """REPO/store.json, or None for a repository whose packs are local."""
    where = os.path.join(repo_path, NAME)
    raw = read_json(where)
    if raw is None:
        return None
    try:
        conf = StoreConf(**raw)
        ok = isinstance(conf.store, str) and isinstance(conf.cache_size, int) and conf.cache_size >= 0 and \
            all(isinstance(v, str) for v in (conf.host, conf.instance, conf.cache)) and \
            isinstance(conf.replica, bool) and isinstance(conf.grace, (int, float)) and conf.grace >= 0
    except TypeError:
        ok = False
    if not ok:
        raise RpofsError(f"{where} is not a store configuration "
                         f'(expected {{"store": "s3://BUCKET/PREFIX", "cache_size": BYTES, "host": NAME}})')
    return conf


def write(repo_path: str, conf: StoreConf) -> None:
    body = {k: v for k, v in dataclasses.asdict(conf).items()
            if not (v == "" or v is False or k == "grace" and v == StoreConf.grace)}
    write_file(os.path.join(repo_path, NAME), json.dumps(body).encode() + b"\n", mode=0o644)
