"""The Redis key layout. Every key of one group shares the ``{group}`` hash tag, so one script
may touch all of them on Redis Cluster.

    <prefix>:{<group>}:tb:<key>      token bucket          HASH {t, ts}
    <prefix>:{<group>}:sw:<key>      sliding-window log    ZSET "<seq>:<cost>" -> admitted ms
    <prefix>:{<group>}:swn:<key>     sliding-window meta   HASH {n, seq}
    <prefix>:{<group>}:lease:<key>   concurrency leases    ZSET lease id -> expiry ms
    <prefix>:{<group>}:block:<key>   block                 STRING blocked-until ms
"""

from __future__ import annotations

from .specs import LimitSpec

MSG_BAD_PREFIX = "prefix must be non-empty and free of braces"


def check_prefix(prefix: str) -> None:
    if not prefix or "{" in prefix or "}" in prefix:
        raise ValueError(MSG_BAD_PREFIX)


def key_for(prefix: str, group: str, part: str, key: str) -> str:
    """Build one key; ``part`` is tb, sw, swn, lease or block."""
    return f"{prefix}:{{{group}}}:{part}:{key}"


def spec_keys(prefix: str, group: str, spec: LimitSpec) -> tuple[str, str, str]:
    """Return the (state, window meta, block) keys of one spec, as acquire.lua expects (a
    concurrency spec's state is its leases; only a window uses its meta)."""
    part = {"token_bucket": "tb", "sliding_window": "sw", "concurrency": "lease"}[spec.kind]
    return (
        key_for(prefix, group, part, spec.key),
        key_for(prefix, group, "swn", spec.key),
        key_for(prefix, group, "block", spec.key),
    )
