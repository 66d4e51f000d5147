"""Checks of an API key's limits (``ipshield keys create``, ``KeyStore.create``): a bad value is an
``IPShieldError`` that names the option and the fix, never a key that is refused forever or a number
the database cannot hold.

- ``rate`` (requests per second): None (the server's default) or a finite number > 0;
- ``burst`` (token-bucket size): None (2 x rate, at least 1) or a finite number >= 1: every request
  costs one token, so a bucket smaller than 1 would answer 429 to every request;
- ``quota`` (embeddings in total): None (the server's default) or a whole number from 0 to
  ``BIGINT_MAX`` (the largest value of the database's BIGINT column).
"""

from __future__ import annotations

import math
import numbers

from ipshield.errors import IPShieldError

BIGINT_MAX = 2**63 - 1  # the largest value a SQL BIGINT (SQLite INTEGER, PostgreSQL bigint) holds
MIN_BURST = 1.0  # one request costs one token


def _number(value, option: str, example: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise IPShieldError(f"{option} must be a number (got {value!r})", f"give a number, e.g. {option} {example}")
    v = float(value)
    if not math.isfinite(v):
        raise IPShieldError(f"{option} must be a finite number (got {value!r})", f"give a finite number, e.g. {option} {example}")
    return v


def check_rate(rate, option: str = "--rate") -> None:
    """A rate in requests per second: finite and > 0 (None: the default)."""
    if rate is None:
        return
    if _number(rate, option, "10") <= 0:
        raise IPShieldError(f"{option} must be greater than 0 (got {rate!r}): a key with no rate can never send a request",
                            f"give requests per second, e.g. {option} 10 (or leave it out for the server's default)")


def check_burst(burst, option: str = "--burst") -> None:
    """A token-bucket size: finite and >= 1 (None: the default, 2 x rate)."""
    if burst is None:
        return
    if _number(burst, option, "20") < MIN_BURST:
        raise IPShieldError(f"{option} must be at least 1 (got {burst!r}): every request costs one token, so a smaller "
                            "bucket would refuse every request with 429",
                            f"give the burst in requests, e.g. {option} 20 (or leave it out: 2 x the rate)")


def check_quota(quota, option: str = "--quota") -> None:
    """Embeddings allowed in total: a whole number from 0 to ``BIGINT_MAX`` (None: the default)."""
    if quota is None:
        return
    if isinstance(quota, bool) or not isinstance(quota, numbers.Integral):
        raise IPShieldError(f"{option} must be a whole number (got {quota!r})", f"give the embeddings allowed, e.g. {option} 100000")
    if quota < 0:
        raise IPShieldError(f"{option} must be 0 or more (got {quota})",
                            f"give the embeddings allowed, e.g. {option} 100000 (or leave it out for the server's default)")
    if quota > BIGINT_MAX:
        raise IPShieldError(f"{option} {quota} is too large: the database holds at most {BIGINT_MAX} (2^63 - 1)",
                            f"give at most {option} {BIGINT_MAX}, or leave it out for the server's default")


def validate_key_limits(rate: float | None, burst: float | None, quota: int | None) -> None:
    """Raise ``IPShieldError`` (naming ``--rate``/``--burst``/``--quota`` and the fix) unless every
    limit is None or valid (see the module doc)."""
    check_rate(rate)
    check_burst(burst)
    check_quota(quota)
