"""Encryption at rest: the one module that knows keys and ciphers (and the
only one importing `cryptography`). The format is in rpofs.store.schema
("Encryption"); in short:

  * a random 32-byte master key, kept in `meta/encryption` wrapped by
    AES-256-GCM under a key scrypt derives from the passphrase;
  * subkeys derived from the master key with blake3's key derivation, one
    per purpose (SUBKEY_CONTEXTS);
  * chunk keys keyed blake3 (Ids), so equal content has equal keys in one
    repository (dedup) and unrelated keys in another;
  * pack records sealed unit by unit (Sealer), catalog values sealed whole
    (CatalogSealer), each bound by its AAD to its place.

An unencrypted repository uses PLAIN_IDS and no sealer: the functions of
format 4 as they were, the same bytes on disk.
"""

import hashlib
import hmac
import json
import os
import struct
import threading
import collections

import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..errors import CorruptChunk, KeyRequired, RpofsError, UnknownFormat, WrongKey
from .schema import PIECE_SIZE, PIECES_KEY_CONTEXT, SEAL_OVERHEAD

NONCE = 12
KEY_RECORD_VERSION = 1
# scrypt: 128 * N * r bytes = 32 MiB, ~0.12 s on the bench machine (2 cores)
SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 15, 8, 1
SCRYPT_MAXMEM = 1 << 30
WRAP_AAD = b"rpofs master key v1\0"
SUBKEY_CONTEXTS = {
    "ids": "rpofs 2025 chunk ids v1",
    "pieces": "rpofs 2025 pieces key v1",
    "packs": "rpofs 2025 pack records v1",
    "catalog": "rpofs 2025 catalog values v1",
    "journal": "rpofs 2025 journal records v1",
    "fingerprint": "rpofs 2025 key fingerprint v1",
}
PACK_KEYS = 1024   # per-pack AES keys kept (each one AESGCM object)
_UNIT_AAD = struct.Struct(">32sIQ")


# -- chunk ids -------------------------------------------------------------------

class Ids:
    """How chunk keys are computed: plain blake3 (unencrypted repositories,
    format 4 as it was) or keyed (encrypted ones, see KeyedIds)."""

    def chunk_key(self, data) -> bytes:
        return blake3.blake3(data).digest()

    def pieces_key(self, hashes) -> bytes:
        """A pieced chunk's key: over its pieces' hashes, kept apart from every
        whole record's key (schema: pieced records)."""
        return blake3.blake3(b"".join(hashes), derive_key_context=PIECES_KEY_CONTEXT).digest()

    def piece_hashes(self, data) -> list[bytes]:
        """The hash of each PIECE_SIZE piece of a full chunk's raw bytes."""
        view = memoryview(data)
        return [self.chunk_key(view[at:at + PIECE_SIZE]) for at in range(0, len(view), PIECE_SIZE)]


class KeyedIds(Ids):
    """Keyed blake3 under the repository's id key: equal content gives equal
    keys inside the repository, and keys that say nothing to anyone without
    the key (no confirming that a repository holds a known file). The pieces
    key has a subkey of its own, so it stays apart from every whole key."""

    def __init__(self, id_key: bytes, pieces_key_key: bytes):
        self._id_key = id_key
        self._pieces = pieces_key_key

    def chunk_key(self, data) -> bytes:
        return blake3.blake3(data, key=self._id_key).digest()

    def pieces_key(self, hashes) -> bytes:
        return blake3.blake3(b"".join(hashes), key=self._pieces).digest()


PLAIN_IDS = Ids()


# -- sealing ----------------------------------------------------------------------

def _seal(aead: AESGCM, plain, aad: bytes) -> bytes:
    nonce = os.urandom(NONCE)
    return nonce + aead.encrypt(nonce, plain, aad)


def _open(aead: AESGCM, sealed, aad: bytes) -> bytes:
    """Raises InvalidTag (also for a unit too short to hold a nonce and tag).
    Views are taken as they are (cryptography 42+): no copy."""
    sealed = memoryview(sealed)
    if len(sealed) < SEAL_OVERHEAD:
        raise InvalidTag()
    return aead.decrypt(sealed[:NONCE], sealed[NONCE:], aad)


def unit_aad(key: bytes, pack: int, offset: int) -> bytes:
    """What binds a sealed unit of a pack record to its record and its place."""
    return _UNIT_AAD.pack(key, pack, offset)


class Sealer:
    """Seals and opens the units of pack records (schema: Encryption). Each
    pack has its own AES key, keyed blake3 of its number under the packs
    subkey: pack numbers are never reused, so the random 96-bit nonces stay
    far below AES-GCM's 2^32 messages a key whatever the repository's size."""
    overhead = SEAL_OVERHEAD

    def __init__(self, packs_key: bytes):
        self._key = packs_key
        self._aeads: collections.OrderedDict[int, AESGCM] = collections.OrderedDict()
        self._lock = threading.Lock()

    def _aead(self, pack: int) -> AESGCM:
        with self._lock:
            aead = self._aeads.get(pack)
            if aead is not None:
                self._aeads.move_to_end(pack)
                return aead
        aead = AESGCM(blake3.blake3(struct.pack(">I", pack), key=self._key).digest())
        with self._lock:
            self._aeads[pack] = aead
            if len(self._aeads) > PACK_KEYS:
                self._aeads.popitem(last=False)
        return aead

    def seal(self, key: bytes, pack: int, offset: int, plain) -> bytes:
        return _seal(self._aead(pack), plain, unit_aad(key, pack, offset))

    def open(self, key: bytes, pack: int, offset: int, sealed, where: str) -> bytes:
        try:
            return _open(self._aead(pack), sealed, unit_aad(key, pack, offset))
        except InvalidTag:
            raise CorruptChunk(f"{where}: does not decrypt at {offset} (damaged, moved, or another "
                               f"repository's key)") from None


class CatalogSealer:
    """Seals the catalog's values that name things (schema.SEALED): AAD is the
    sub-database's name and the entry's LMDB key, so a value moved to
    another entry fails."""

    def __init__(self, catalog_key: bytes, path: str):
        self._aead = AESGCM(catalog_key)
        self._path = path

    def seal(self, db: str, key: bytes, plain: bytes) -> bytes:
        return _seal(self._aead, plain, db.encode() + b"\0" + bytes(key))

    def open(self, db: str, key: bytes, sealed) -> bytes:
        try:
            return _open(self._aead, sealed, db.encode() + b"\0" + bytes(key))
        except InvalidTag:
            raise RpofsError(f"repository {self._path}: catalog entry {db}/{bytes(key).hex()} does not "
                             f"decrypt (damaged)") from None


class JournalSealer:
    """Seals the data of continuous protection's journal records (rpofs.store.journal):
    AAD is the record's header without its hash (magic, kind, disk, offset,
    length, time), so data moved under another header, or to another
    place or time, fails to open."""

    def __init__(self, journal_key: bytes):
        self._aead = AESGCM(journal_key)

    def seal(self, head: bytes, data) -> bytes:
        return _seal(self._aead, data, head)

    def open(self, head: bytes, sealed, where: str) -> bytes:
        try:
            return _open(self._aead, sealed, head)
        except InvalidTag:
            raise CorruptChunk(f"{where} does not decrypt (damaged, or of another key)") from None


# -- keys -------------------------------------------------------------------------

def _subkey(master: bytes, purpose: str) -> bytes:
    return blake3.blake3(master, derive_key_context=SUBKEY_CONTEXTS[purpose]).digest()


class Keys:
    """A repository's keys, unwrapped: what Repository holds."""

    def __init__(self, master: bytes, path: str):
        assert len(master) == 32
        self.master = master
        self.ids = KeyedIds(_subkey(master, "ids"), _subkey(master, "pieces"))
        self.packs = Sealer(_subkey(master, "packs"))
        self.catalog = CatalogSealer(_subkey(master, "catalog"), path)
        self.journal = JournalSealer(_subkey(master, "journal"))
        self.fingerprint = fingerprint(master)


def fingerprint(master: bytes) -> str:
    """What names a master key (shown by rpofs status; it reveals nothing of it)."""
    return _subkey(master, "fingerprint")[:8].hex()


def _kek(passphrase: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(passphrase.encode(), salt=salt, n=n, r=r, p=p, maxmem=SCRYPT_MAXMEM, dklen=32)


def _wrap(master: bytes, repo_id: bytes, passphrase: str) -> bytes:
    """A key record: `master` sealed under a key scrypt derives from
    `passphrase` with a new random salt, for the repository `repo_id`."""
    if not passphrase:
        raise RpofsError("the passphrase is empty")
    salt = os.urandom(16)
    kek = _kek(passphrase, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    record = {
        "version": KEY_RECORD_VERSION, "repository": repo_id.hex(),
        "kdf": "scrypt", "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P, "salt": salt.hex(),
        "cipher": "aes-256-gcm", "wrapped": _seal(AESGCM(kek), master, WRAP_AAD + repo_id).hex(),
        "fingerprint": fingerprint(master),
    }
    return json.dumps(record, sort_keys=True).encode()


def new_key_record(passphrase: str, path: str) -> tuple[bytes, Keys]:
    """(meta/encryption's value, the keys) for a new repository."""
    master, repo_id = os.urandom(32), os.urandom(16)
    return _wrap(master, repo_id, passphrase), Keys(master, path)


def rewrap(value: bytes, keys: Keys, new_passphrase: str, path: str) -> bytes:
    """The key record `value` with the same master key wrapped under
    `new_passphrase` (a new salt; scrypt's parameters as a new repository's
    get): only this record changes, every subkey, chunk key and sealed byte
    stays valid, and so does the fingerprint. `keys` must be the ones
    `value` unwraps to (they were unlocked from it): a record replaced
    meanwhile is refused, not overwritten."""
    record = _read_record(value, path)
    if not hmac.compare_digest(str(record.get("fingerprint", "")), keys.fingerprint):
        raise WrongKey(f"repository {path}: its key record is not the one its key was unlocked from")
    try:
        repo_id = bytes.fromhex(record["repository"])
    except (ValueError, KeyError, TypeError):
        raise RpofsError(f"repository {path}: its key record (meta/encryption) is damaged") from None
    return _wrap(keys.master, repo_id, new_passphrase)


def _read_record(value: bytes, path: str) -> dict:
    try:
        record = json.loads(bytes(value))
        version, kdf, cipher = record["version"], record["kdf"], record["cipher"]
    except (ValueError, KeyError, TypeError):
        raise RpofsError(f"repository {path}: its key record (meta/encryption) is damaged") from None
    if (version, kdf, cipher) != (KEY_RECORD_VERSION, "scrypt", "aes-256-gcm"):
        raise UnknownFormat(f"repository {path} is encrypted in a way this rpofs cannot read "
                            f"(key record version {version}, {kdf}, {cipher})")
    return record


def unwrap(value: bytes, passphrase: str, path: str) -> Keys:
    """The keys of the repository whose key record is `value`; WrongKey if
    the passphrase is not its."""
    record = _read_record(value, path)
    try:
        salt, repo_id, wrapped = (bytes.fromhex(record[k]) for k in ("salt", "repository", "wrapped"))
        n, r, p = int(record["n"]), int(record["r"]), int(record["p"])
    except (ValueError, KeyError, TypeError):
        raise RpofsError(f"repository {path}: its key record (meta/encryption) is damaged") from None
    if not (n > 1 and n & (n - 1) == 0 and 128 * n * r * p <= SCRYPT_MAXMEM // 2):
        raise UnknownFormat(f"repository {path}: its key record asks for scrypt n={n} r={r} p={p}, "
                            f"which this rpofs does not run")
    try:
        master = _open(AESGCM(_kek(passphrase, salt, n, r, p)), wrapped, WRAP_AAD + repo_id)
    except InvalidTag:
        raise WrongKey(f"wrong passphrase for repository {path}") from None
    return Keys(master, path)


class KeySource:
    """Where Repository.open gets the keys of an encrypted repository from;
    asked only when the repository is encrypted."""

    def unlock(self, value: bytes, path: str) -> Keys | None:
        """The keys (None: no passphrase to be had); WrongKey if it is wrong."""
        raise NotImplementedError


class Passphrase(KeySource):
    """A passphrase got only when needed (get() may prompt); None: none given."""

    def __init__(self, get):
        self._get = get
        self._got = False
        self._text = None

    def unlock(self, value: bytes, path: str) -> Keys | None:
        _read_record(value, path)  # an unreadable record is said before anyone is asked
        if not self._got:
            self._text, self._got = self._get(), True
        if self._text is None:
            return None
        return unwrap(value, self._text, path)


class MasterKey(KeySource):
    """The master key itself, as a parent process hands it to the mount it
    starts (never in argv or the environment)."""

    def __init__(self, master: bytes):
        self._master = bytes(master)

    def unlock(self, value: bytes, path: str) -> Keys | None:
        record = _read_record(value, path)
        if len(self._master) != 32 or not hmac.compare_digest(fingerprint(self._master),
                                                              str(record.get("fingerprint", ""))):
            raise WrongKey(f"wrong key for repository {path}")
        return Keys(self._master, path)


def key_required(path: str) -> KeyRequired:
    return KeyRequired(f"repository {path} is encrypted: give the passphrase with --key-file, "
                       f"$RPOFS_KEY_FILE or $RPOFS_PASSPHRASE")
