"""Webhooks: each team's signing secret, the signature, and which targets may be called.

**Secrets.** A team's secret is derived, never stored: ``HMAC-SHA256(operator key, team:version)``
(the operator key is ``KDQ_WEBHOOK_KEY``, or a random key kept in ``<data_dir>/webhook.key``). The
database holds only the version, which a rotation bumps; a leaked database leaks no secret, and
the secret is shown to the team only when it is made (``POST /v1/webhooks/secret``). For a day
after a rotation deliveries carry a signature with the previous secret too, so a receiver can
switch over without losing any.

**Signature.** Each attempt is signed afresh: ``Kdq-Webhook-Timestamp`` (Unix seconds) and
``Kdq-Webhook-Signature: v1=<hex>`` (one ``v1=`` per valid secret, space-separated), where hex
is ``HMAC-SHA256(secret, f"{timestamp}.{body}")``. A receiver recomputes it over the raw body and
refuses a timestamp outside its replay window (`kdq.webhooks.verify`: five minutes).

**Targets.** ``http``/``https`` only; every address the host resolves to must be a public one,
unless the operator allows the network or host (``KDQ_WEBHOOK_ALLOW``): loopback, private,
link-local (cloud metadata), multicast and reserved addresses are refused at submission and
again at each attempt (DNS may change), and the attempt connects to the address it checked.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import os
import secrets
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy.orm import Session

from .models import Job, Team, WebhookDelivery, new_id, utcnow
from .settings import Settings

SIGNATURE_HEADER = "Kdq-Webhook-Signature"
TIMESTAMP_HEADER = "Kdq-Webhook-Timestamp"
ID_HEADER = "Kdq-Webhook-Id"
EVENT_HEADER = "Kdq-Webhook-Event"
PREVIOUS_SECRET_VALID = timedelta(days=1)
"""After a rotation, deliveries are signed with the previous secret too for this long."""
SECRET_PREFIX = "whsec_"


def operator_key(settings: Settings) -> bytes:
    """``KDQ_WEBHOOK_KEY``, else the data dir's key file (made once, readable by its owner only)."""
    if settings.webhook_key is not None:
        return settings.webhook_key.get_secret_value().encode()
    path = Path(settings.data_dir) / "webhook.key"
    try:
        return path.read_bytes().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(32).encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first
        return path.read_bytes().strip()
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    return key


def team_secret(key: bytes, team_id: str, version: int) -> str:
    digest = hmac.new(key, f"kdq-webhook:{team_id}:{version}".encode(), hashlib.sha256).digest()
    return SECRET_PREFIX + base64.urlsafe_b64encode(digest).decode().rstrip("=")


@dataclass(frozen=True)
class SecretInfo:
    version: int
    rotated_at: datetime
    secret: str | None = None
    """Only when just made."""


def rotate_secret(s: Session, settings: Settings, team_id: str) -> SecretInfo:
    """Make the team's first secret, or replace it (the previous one signs along for a day)."""
    team = s.get(Team, team_id, with_for_update=True)
    assert team is not None, team_id
    team.webhook_secret_version = (team.webhook_secret_version or 0) + 1
    team.webhook_secret_rotated_at = utcnow()
    secret = team_secret(operator_key(settings), team_id, team.webhook_secret_version)
    return SecretInfo(team.webhook_secret_version, team.webhook_secret_rotated_at, secret)


def secret_info(s: Session, team_id: str) -> SecretInfo | None:
    team = s.get(Team, team_id)
    if team is None or not team.webhook_secret_version or team.webhook_secret_rotated_at is None:
        return None
    return SecretInfo(team.webhook_secret_version, team.webhook_secret_rotated_at)


def signing_secrets(key: bytes, team_id: str, info: SecretInfo | None, now: datetime) -> list[str]:
    """The secrets a delivery is signed with now: the current one, and the previous for a day."""
    if info is None:
        return []
    out = [team_secret(key, team_id, info.version)]
    if info.version > 1 and now - info.rotated_at < PREVIOUS_SECRET_VALID:
        out.append(team_secret(key, team_id, info.version - 1))
    return out


def signature_headers(body: bytes, secrets_: list[str], timestamp: int) -> dict[str, str]:
    signed = str(timestamp).encode() + b"." + body
    sigs = [hmac.new(sec.encode(), signed, hashlib.sha256).hexdigest() for sec in secrets_]
    return {TIMESTAMP_HEADER: str(timestamp), SIGNATURE_HEADER: " ".join(f"v1={sig}" for sig in sigs)}


# --- targets -----------------------------------------------------------------------------------


class TargetRefused(ValueError):
    """A webhook URL the service will not call (the message says why)."""


def _allowed(allow: str) -> tuple[list[ipaddress.IPv4Network | ipaddress.IPv6Network], set[str]]:
    networks, hosts = [], set()
    for item in (part.strip() for part in allow.split(",")):
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            hosts.add(item.lower())
    return networks, hosts


def _public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not (ip.is_multicast or ip.is_reserved)


@dataclass(frozen=True)
class Target:
    url: str
    host: str
    scheme: str
    port: int
    address: str
    """The checked address the attempt connects to."""

    def pinned_url(self) -> str:
        """The URL with the checked address in place of the host name (sent with ``Host``)."""
        parts = urlsplit(self.url)
        host = f"[{self.address}]" if ":" in self.address else self.address
        return parts._replace(netloc=f"{host}:{self.port}").geturl()


def check_target(url: str, allow: str, resolve: Any = socket.getaddrinfo) -> Target:
    """The target to call, or `TargetRefused` saying why not."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise TargetRefused("the webhook URL must be http:// or https://")
    if not parts.hostname:
        raise TargetRefused("the webhook URL has no host")
    if parts.username or parts.password:
        raise TargetRefused("the webhook URL must not carry credentials; verify the signature instead")
    host = parts.hostname.lower()
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise TargetRefused("the webhook URL's port is not a number from 1 to 65535") from None
    try:
        infos = resolve(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise TargetRefused(f"the webhook host {host!r} does not resolve ({exc})") from None
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    if not addresses:
        raise TargetRefused(f"the webhook host {host!r} does not resolve")
    networks, hosts = _allowed(allow)
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%")[0])
        if _public(ip) or host in hosts or any(ip in net for net in networks):
            continue
        raise TargetRefused(
            f"the webhook host {host!r} is {ip}, a loopback, private, link-local or reserved address; "
            "the operator must allow it (KDQ_WEBHOOK_ALLOW) before webhooks may go there"
        )
    return Target(url, host, parts.scheme, port, addresses[0])


# --- the outbox row ----------------------------------------------------------------------------


def queue_delivery(s: Session, job: Job) -> None:
    """(In the transaction of a job's final state change.) A delivery for its ``notify`` URL."""
    url = (job.notify or {}).get("url")
    if not url:
        return
    now = utcnow()
    s.add(WebhookDelivery(id=new_id("whd"), job_id=job.id, team_id=job.team_id, url=url, event=str(job.state),
                          state="pending", attempts=[], next_attempt_at=now, created_at=now))  # fmt: skip
