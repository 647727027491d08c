"""Redis-backed speculation index (ssd/speculation/index.py protocol): pipelined batch stores and
lookups with a TTL. Redis trouble never fails a request: errors count as misses."""
from __future__ import annotations

import logging
import struct

import redis

from ssd.speculation.index import IndexCounters

log = logging.getLogger(__name__)


class RedisIndex:
    def __init__(self, url: str, ttl_s: float = 60.0, timeout_s: float = 0.05):
        # a short socket timeout: a slow or dead Redis must not stall the verify loop
        self.client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self.ttl_ms = int(ttl_s * 1000)
        self.counters = IndexCounters()

    def put_many(self, items: dict[str, list[int]]) -> None:
        try:
            pipe = self.client.pipeline(transaction=False)
            for key, tokens in items.items():
                pipe.set(key, struct.pack(f"<{len(tokens)}i", *tokens), px=self.ttl_ms)
            pipe.execute()
            self.counters.stored += len(items)
        except redis.RedisError as e:
            self.counters.errors += 1
            log.debug("index store failed: %s", e)

    def get_many(self, keys: list[str]) -> list[list[int] | None]:
        try:
            values = self.client.mget(keys)
        except redis.RedisError as e:
            self.counters.errors += 1
            self.counters.miss += len(keys)
            log.debug("index lookup failed: %s", e)
            return [None] * len(keys)
        out = []
        for v in values:
            if v is None:
                self.counters.miss += 1
                out.append(None)
            else:
                self.counters.hit += 1
                out.append(list(struct.unpack(f"<{len(v) // 4}i", v)))
        return out

    def delete_many(self, keys: list[str]) -> None:
        if not keys:
            return
        try:
            self.client.delete(*keys)
        except redis.RedisError as e:
            self.counters.errors += 1
            log.debug("index delete failed: %s", e)
