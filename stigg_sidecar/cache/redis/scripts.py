"""The Lua scripts the mirror runs in Redis: each is one atomic step (EVAL) of the format's rules."""

from __future__ import annotations

# Newer wins (STIGG_REFERENCE §3.4 Writes 3-4), atomically for every item of one call.
# KEYS[1]: the entry's entitlements#timestamp (the guard), then key, key#timestamp per item.
# ARGV: ttl (<= 0: no expiry), guarded ("1": write nothing unless KEYS[1] exists), channel,
#       message (published when anything was written; "" channel: none), then value, stamp per item.
# Returns 1/0 per item: written or skipped as stale.
WRITE = """
local ttl = tonumber(ARGV[1])
if ARGV[2] == '1' and redis.call('EXISTS', KEYS[1]) == 0 then return {} end
local written, changed = {}, false
for i = 1, (#KEYS - 1) / 2 do
  local key, stamp_key = KEYS[2 * i], KEYS[2 * i + 1]
  local value, stamp = ARGV[3 + 2 * i], ARGV[4 + 2 * i]
  local incoming = tonumber(stamp)
  local stored = tonumber(redis.call('GET', stamp_key))
  if stored == nil or incoming == 0 or stored <= incoming then
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

# KEYS[1]: the lock. ARGV: token, channel, message. Deletes the lock only if it is still ours,
# and tells the waiters either way: the fetch is over.
RELEASE = """
local n = 0
if redis.call('GET', KEYS[1]) == ARGV[1] then n = redis.call('DEL', KEYS[1]) end
redis.call('PUBLISH', ARGV[2], ARGV[3])
return n
"""

