"""For a webhook receiver: check that a delivery comes from the kdq service, and is fresh.

::

    from kdq.webhooks import verify, InvalidSignature

    try:
        job = verify(secret, request.headers, raw_body)   # the job document, as a dict
    except InvalidSignature as exc:
        return 400, str(exc)

``secret`` is the team's webhook secret (``kdq webhooks secret --rotate`` shows a new one once).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from typing import Any

SIGNATURE_HEADER = "Kdq-Webhook-Signature"
TIMESTAMP_HEADER = "Kdq-Webhook-Timestamp"
TOLERANCE_S = 300
"""The replay window: a delivery signed longer ago than this (or as far in the future) is refused."""


class InvalidSignature(ValueError):
    pass


def _header(headers: Mapping[str, str], name: str) -> str | None:
    for key, value in headers.items():
        if key.lower() == name.lower():
            return value
    return None


def verify(secret: str, headers: Mapping[str, str], body: bytes, *, tolerance_s: float = TOLERANCE_S,
           now: float | None = None) -> dict[str, Any]:  # fmt: skip
    """The delivered job document, or `InvalidSignature` saying what is wrong."""
    stamp, signature = _header(headers, TIMESTAMP_HEADER), _header(headers, SIGNATURE_HEADER)
    if not stamp or not signature:
        raise InvalidSignature(f"missing {TIMESTAMP_HEADER} or {SIGNATURE_HEADER}")
    try:
        ts = int(stamp)
    except ValueError:
        raise InvalidSignature(f"{TIMESTAMP_HEADER} is not a number") from None
    if abs((time.time() if now is None else now) - ts) > tolerance_s:
        raise InvalidSignature(f"the delivery was signed {int(abs(time.time() - ts))} s away from now (replay?)")
    expected = hmac.new(secret.encode(), f"{ts}.".encode() + body, hashlib.sha256).hexdigest()
    given = [part.removeprefix("v1=") for part in signature.split() if part.startswith("v1=")]
    if not any(hmac.compare_digest(expected, sig) for sig in given):
        raise InvalidSignature("no signature matches this secret")
    return json.loads(body)
