"""The Redis mirror (REDIS_ENVIRONMENT_PREFIX): the cache in Stigg's Redis format, shared by a fleet.

`mirror.RedisMirror` is the service its owner calls; `format/` is the key layout and JSON
(docs/redis-format.md); `links` the connections, `sentinel` the master lookup, `scripts` the Lua,
`reads` the read of one entry, `locks` the fleet's fetch lock, `errors` the error policy.
"""

from stigg_sidecar.cache.redis.mirror import RedisMirror

__all__ = ["RedisMirror"]
