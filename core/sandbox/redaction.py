"""Defence in depth for the sandbox: secrets this process knows are cut out of whatever untrusted
code returns (a grader's error text, hack flags, diagnostics; an environment's messages) before
it is stored, logged or shown to the model.

The sandbox's minimal root already keeps them out of its view (root.py); this
catches what might still get through. Known secrets: the Ray cluster token (`$RAY_AUTH_TOKEN`,
the file `$RAY_AUTH_TOKEN_PATH` or `~/.ray/auth_token`), the values of environment variables named
RFT_* or *_TOKEN, *_KEY, *_SECRET, *_PASSWORD, the password of any *REDIS_URL variable, and the
extra values the caller passes (e.g. the password of `cluster.redis_url`). Only values of at
least MIN_SECRET_CHARS characters count, so that short values do not cut common words out.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

SECRET_SUFFIXES = ("_TOKEN", "_KEY", "_SECRET", "_PASSWORD")
MIN_SECRET_CHARS = 8
REDACTED = "[REDACTED]"


def url_password(url: str | None) -> list[str]:
    """The password of a URL such as redis://:PASSWORD@host:6379/0, as a list (empty if none)."""
    try:
        password = urlsplit(url).password if url else None
    except ValueError:
        return []
    return [password] if password else []


def _ray_token(environ) -> list[str]:
    path = Path(environ.get("RAY_AUTH_TOKEN_PATH") or Path(environ.get("HOME", "~")) / ".ray" / "auth_token")
    try:
        return [path.expanduser().read_text().strip()]
    except (OSError, UnicodeDecodeError):
        return []


def known_secrets(extra: tuple[str, ...] = (), environ=None) -> list[str]:
    """Every secret value this process knows, longest first."""
    environ = os.environ if environ is None else environ
    values = list(extra) + _ray_token(environ)
    for name, value in environ.items():
        upper = name.upper()
        if upper.startswith("RFT_") or upper.endswith(SECRET_SUFFIXES):
            values.append(value)
        if upper.endswith("REDIS_URL"):
            values += url_password(value)
    secrets = {value for value in values if len(value) >= MIN_SECRET_CHARS}
    return sorted(secrets, key=len, reverse=True)


def redact(text: str, secrets: list[str]) -> tuple[str, int]:
    """`text` with every secret replaced by REDACTED, and how many were replaced."""
    count = 0
    for secret in secrets:
        if secret in text:
            count += text.count(secret)
            text = text.replace(secret, REDACTED)
    return text, count


def redact_all(texts: list[str], secrets: list[str]) -> tuple[list[str], int]:
    results = [redact(text, secrets) for text in texts]
    return [text for text, _ in results], sum(count for _, count in results)


def redact_json(value, secrets: list[str]):
    """A JSON value (dicts, lists, strings, ...) with every string redacted, keys included, and
    how many secrets were replaced."""
    if not secrets:
        return value, 0
    if isinstance(value, str):
        return redact(value, secrets)
    if isinstance(value, list):
        parts = [redact_json(v, secrets) for v in value]
        return [v for v, _ in parts], sum(n for _, n in parts)
    if isinstance(value, dict):
        parts = [(redact_json(k, secrets), redact_json(v, secrets)) for k, v in value.items()]
        return {k: v for (k, _), (v, _) in parts}, sum(kn + vn for (_, kn), (_, vn) in parts)
    return value, 0
