"""The Lua scripts the mirror runs in Redis: each is one atomic step (EVAL) of the format's rules."""

from __future__ import annotations

# Newer wins (STIGG_REFERENCE §3.4 Writes 3-4), atomically for every item of one call, except over
# a stored stamp beyond `trusted_until` (in the future past a small clock skew: planted or from a
# clock far ahead, it would otherwise block Stigg's answers for the keys' whole TTL), or when
# `force`d (a reload, a push: Stigg's word even when its timestamp went backwards).
# KEYS[1]: the entry's entitlements#timestamp (the guard), then key, key#timestamp per item.
# ARGV: ttl (<= 0: no expiry), guarded ("1": write nothing unless KEYS[1] exists), channel,
#       message (published when anything was written; "" channel: none), trusted_until (epoch ms),
#       force ("1"), then value, stamp per item.
# Returns 1/0 per item: written or skipped as stale.
WRITE = """
local ttl = tonumber(ARGV[1])
if ARGV[2] == '1' and redis.call('EXISTS', KEYS[1]) == 0 then return {} end
local trusted_until, force = tonumber(ARGV[5]), ARGV[6] == '1'
local written, changed = {}, false
for i = 1, (#KEYS - 1) / 2 do
  local key, stamp_key = KEYS[2 * i], KEYS[2 * i + 1]
  local value, stamp = ARGV[5 + 2 * i], ARGV[6 + 2 * i]
  local incoming = tonumber(stamp)
  local stored = tonumber(redis.call('GET', stamp_key))
  if force or stored == nil or incoming == 0 or stored <= incoming or stored > trusted_until then
    if ttl > 0 then
      redis.call('SET', key, value, 'EX', ttl)
      redis.call('SET', stamp_key, stamp, 'EX', ttl)
    else
      redis.call('SET', key, value)
      redis.call('SET', stamp_key, stamp)
    end
    written[i] = 1
    changed = true
  else
    written[i] = 0
  end
end
if changed and ARGV[3] ~= '' then redis.call('PUBLISH', ARGV[3], ARGV[4]) end
return written
"""

# KEYS: the keys to delete. ARGV: channel, message (always published).
PURGE = """
local n = redis.call('DEL', unpack(KEYS))
redis.call('PUBLISH', ARGV[1], ARGV[2])
return n
"""

# KEYS[1]: the lock. ARGV: token, ttl (ms). Takes the lock when it is free, or when it has no
# expiry (a lock must always carry one: without, its customer would wait on it for good).
ACQUIRE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 'OK' end
if redis.call('PTTL', KEYS[1]) == -1 then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 'OK'
end
return false
"""

# KEYS: the entry's entitlements key, then the other keys of the read. ARGV: the largest
# entitlements value read (bytes). Past it the read is a miss, answered with the value's size:
# the value never crosses to the sidecar (a poisoned 27 MB value blocked the reactor for 3 s).
READ = """
local size = redis.call('STRLEN', KEYS[1])
if size > tonumber(ARGV[1]) then return size end
return redis.call('MGET', unpack(KEYS))
"""

# KEYS[1]: the lock. ARGV: token, channel, message. Deletes the lock only if it is still ours,
# and tells the waiters either way: the fetch is over.
RELEASE = """
local n = 0
if redis.call('GET', KEYS[1]) == ARGV[1] then n = redis.call('DEL', KEYS[1]) end
redis.call('PUBLISH', ARGV[2], ARGV[3])
return n
"""

