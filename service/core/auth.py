"""Team API keys: made, listed, revoked, and checked on every request (no FastAPI, no torch).

A key reads ``kdq_<prefix>_<secret>``: ``prefix`` (8 letters and digits) finds its row,
``secret`` (32 random bytes, URL-safe base64) makes it unguessable. Only the sha256 of
the whole key is stored; the check compares hashes with `hmac.compare_digest`. An
unknown, revoked or malformed key is the same failure to the caller (one 401).

A process remembers a key it has accepted for ``auth_cache_s`` seconds (`KeyCache`), so a
revocation takes effect on every API replica within that time (5 s by default).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import string
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

from sqlalchemy import or_, select, update
from sqlalchemy.exc import IntegrityError

from .db import Database
from .models import ApiKey, Team, new_id, utcnow

Scope = Literal["team", "admin"]
KEY_PREFIX = "kdq_"
PREFIX_LEN = 8
SECRET_BYTES = 32
_ALPHABET = string.ascii_lowercase + string.digits
_KEY = re.compile(r"^kdq_([a-z0-9]{8})_([A-Za-z0-9_-]{43,128})$")
TEAM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
LAST_USED_EVERY = timedelta(minutes=1)
"""``last_used_at`` is written at most this often per key (not on every request)."""
_DUMMY_HASH = "0" * 64


@dataclass(frozen=True)
class Principal:
    """Who is calling: a team, with ``team`` scope (its own resources) or ``admin`` (every team's).

    An admin creates resources as its own team (``team_id``) and reads everyone's.
    """

    team_id: str
    scope: Scope = "team"

    @property
    def is_admin(self) -> bool:
        return self.scope == "admin"

    def sees(self, team_id: str) -> bool:
        """Whether a resource of ``team_id`` exists for this caller (others answer 404)."""
        return self.is_admin or team_id == self.team_id


@dataclass(frozen=True)
class NewKey:
    """A key just made: ``key`` is shown once and never stored."""

    id: str
    team_id: str
    prefix: str
    scope: Scope
    label: str
    key: str


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def generate_key() -> tuple[str, str]:
    """A fresh ``(prefix, key)``."""
    prefix = "".join(secrets.choice(_ALPHABET) for _ in range(PREFIX_LEN))
    return prefix, f"{KEY_PREFIX}{prefix}_{secrets.token_urlsafe(SECRET_BYTES)}"


def parse_key(key: str) -> str | None:
    """The lookup prefix of a well-formed key, else None."""
    m = _KEY.match(key)
    return m.group(1) if m else None


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def check_team_name(team: str) -> str:
    if not TEAM_NAME.match(team):
        raise ValueError(
            f"team name {team!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return team


def ensure_team(db: Database, team: str) -> None:
    """Create the team row if it is missing (safe when two processes race to do it)."""
    with db.read() as s:
        if s.get(Team, team) is not None:
            return
    try:
        with db.write() as s:
            if s.get(Team, team) is None:
                s.add(Team(id=team, name=team))
    except IntegrityError:  # another process created it first
        pass


def create_key(db: Database, team: str, *, scope: Scope = "team", label: str = "") -> NewKey:
    """Make a key for ``team`` (creating the team if needed); the returned ``key`` is its only copy."""
    check_team_name(team)
    if scope not in ("team", "admin"):
        raise ValueError(f"scope must be 'team' or 'admin', not {scope!r}")
    ensure_team(db, team)
    for _ in range(5):  # a prefix collision (1 in 36^8 per existing key) just draws again
        prefix, key = generate_key()
        row = ApiKey(
            id=new_id("key"), team_id=team, prefix=prefix, sha256=hash_key(key), scope=scope, label=label
        )
        try:
            with db.write() as s:
                s.add(row)
        except IntegrityError:
            continue
        return NewKey(row.id, team, prefix, scope, label, key)
    raise RuntimeError("could not draw an unused key prefix")


def find_key(db: Database, ref: str) -> ApiKey | None:
    """A key by its id, its prefix, or the whole key."""
    ref = ref.strip()
    prefix = parse_key(ref) or ref
    with db.read() as s:
        return s.scalars(select(ApiKey).where(or_(ApiKey.id == ref, ApiKey.prefix == prefix))).first()


def revoke_key(db: Database, ref: str) -> ApiKey | None:
    """Revoke a key (by id, prefix or the whole key); None when there is no such key.
    Revoking twice keeps the first time."""
    found = find_key(db, ref)
    if found is None:
        return None
    with db.write() as s:
        row = s.get(ApiKey, found.id)
        assert row is not None
        if row.revoked_at is None:
            row.revoked_at = utcnow()
        return row


def list_keys(db: Database, team: str | None = None) -> list[ApiKey]:
    stmt = select(ApiKey).order_by(ApiKey.team_id, ApiKey.created_at)
    if team is not None:
        stmt = stmt.where(ApiKey.team_id == team)
    with db.read() as s:
        return list(s.scalars(stmt))


def has_active_key(db: Database) -> bool:
    with db.read() as s:
        return s.scalars(select(ApiKey.id).where(ApiKey.revoked_at.is_(None)).limit(1)).first() is not None


def lookup(db: Database, key: str) -> Principal | None:
    """The principal of a valid, unrevoked key; None for anything else (same work either way,
    as far as the hash comparison goes)."""
    prefix = parse_key(key)
    digest = hash_key(key)
    row = None
    if prefix is not None:
        with db.read() as s:
            row = s.scalars(select(ApiKey).where(ApiKey.prefix == prefix)).first()
    stored = row.sha256 if row is not None else _DUMMY_HASH
    matches = hmac.compare_digest(stored.encode(), digest.encode())
    if row is None or not matches or row.revoked_at is not None:
        return None
    now = utcnow()
    if row.last_used_at is None or now - row.last_used_at >= LAST_USED_EVERY:
        with db.write() as s:
            s.execute(update(ApiKey).where(ApiKey.id == row.id).values(last_used_at=now))
    return Principal(row.team_id, "admin" if row.scope == "admin" else "team")


class KeyCache:
    """Keys this process accepted recently, by their sha256, for ``ttl_s`` seconds.

    Only successes are remembered: a wrong key always costs one indexed lookup.
    """

    MAX_ENTRIES = 4096

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._entries: dict[str, tuple[float, Principal]] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> Principal | None:
        if self.ttl_s <= 0:
            return None
        digest = hash_key(key)
        with self._lock:
            entry = self._entries.get(digest)
            if entry is None:
                return None
            if entry[0] <= time.monotonic():
                del self._entries[digest]
                return None
            return entry[1]

    def put(self, key: str, principal: Principal) -> None:
        if self.ttl_s <= 0:
            return
        with self._lock:
            if len(self._entries) >= self.MAX_ENTRIES:
                now = time.monotonic()
                self._entries = {k: v for k, v in self._entries.items() if v[0] > now}
                if len(self._entries) >= self.MAX_ENTRIES:
                    self._entries.clear()
            self._entries[hash_key(key)] = (time.monotonic() + self.ttl_s, principal)
