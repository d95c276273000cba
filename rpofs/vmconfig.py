"""Settings of one VM that the floors below the ingester take, as frozen
dataclasses: the ingester's configuration (rpofs.ingest.config) parses the
TOML and builds them, `rpofs ship` and the ingester pass them down, and the
code that acts on them reads them without depending on the ingester.

Here: AppConfig, for rpofs.apps. Which disks a VM's chains cover
(DiskChoice) lives with the code that applies it, rpofs.virt.disks; how a
backup freezes the guest (Quiesce) with the backup machinery's other
settings, rpofs.ingest.config, as only backups use it."""

from dataclasses import dataclass


@dataclass(frozen=True)
class AppConfig:
    """An application whose log the ingester ships from inside the guest
    through its agent (rpofs.apps): a SQLite database in WAL mode, or
    append-only files (a glob)."""
    name: str
    kind: str                           # "sqlite" | "files"
    path: str                           # absolute guest path; for files a glob (* ? [...] in the last part)
    interval_s: float = 1.0
