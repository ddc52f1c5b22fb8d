//! The Lua scripts of the Redis provider. Each runs atomically on the server, so a write that
//! touches the event hash, its indexes, the stream and the group's pending list is all or
//! nothing. Error replies carry a code word first (`DUPLICATE`, `NOTFOUND`, `NOTLEASED`,
//! `INVALIDSTATE`) that [`super::RedisProvider`] maps to [`crate::provider::ProviderError`].
//!
//! Keys are built inside some scripts from the stream name (passed as an argument), so the
//! provider needs a single Redis primary (optionally with replicas or Sentinel), not Redis
//! Cluster.

use redis::Script;

/// Stores a new event (hash + indexes) and, when `deliver` is set, appends it to the stream.
///
/// KEYS: hash, stream, idx:all, idx:status:S, idx:source:S, idx:instance:I, instances,
/// idx:finished, trim. ARGV: id, event json, status, state json, created score, deliver (0/1),
/// finished score or "", expire seconds, watch channel, source, instance.
const STORE: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then
  return redis.error_reply('DUPLICATE event ' .. ARGV[1] .. ' exists')
end
redis.call('HSET', KEYS[1], 'event', ARGV[2], 'status', ARGV[3], 'state', ARGV[4],
  'source', ARGV[10], 'instance', ARGV[11])
redis.call('ZADD', KEYS[3], ARGV[5], ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[5], ARGV[1])
redis.call('ZADD', KEYS[5], ARGV[5], ARGV[1])
redis.call('ZADD', KEYS[6], ARGV[5], ARGV[1])
redis.call('SADD', KEYS[7], ARGV[11])
if ARGV[7] ~= '' then
  redis.call('ZADD', KEYS[8], ARGV[7], ARGV[1])
  redis.call('EXPIRE', KEYS[1], ARGV[8])
end
if ARGV[6] == '1' then
  local bound = redis.call('GET', KEYS[9])
  if bound then
    redis.call('XADD', KEYS[2], 'MINID', '~', bound, '*', 'id', ARGV[1])
  else
    redis.call('XADD', KEYS[2], '*', 'id', ARGV[1])
  end
end
redis.call('PUBLISH', ARGV[9],
  '{"event":' .. ARGV[2] .. ',"status":"' .. ARGV[3] .. '","state":' .. ARGV[4] .. '}')
return 1
"#;

/// Applies one status transition, with whatever acknowledgement and redelivery it implies.
///
/// ARGV: 1 stream (prefix of every key), 2 event id, 3 mode (`update`, `complete`, `retry`,
/// `release`, `requeue`), 4 group, 5 consumer, 6 stream entry id, 7 new status, 8 state json
/// (or "" to keep), 9 finished score, 10 expire seconds, 11 redelivery due (unix ms; 0 = now),
/// 12 deliveries so far (carried to the redelivered entry), 13 dead-letter error,
/// 14 dead-letter stream max length, 15 watch channel, 16 now (unix ms).
///
/// Returns `{'ok', status}`, or `{'gone'}` when the event was deleted (the entry is still
/// acknowledged).
const OUTCOME: &str = r#"
local p, id, mode = ARGV[1], ARGV[2], ARGV[3]
local group, consumer, entry = ARGV[4], ARGV[5], ARGV[6]
local leased = mode == 'complete' or mode == 'retry' or mode == 'release'
if leased then
  local pend = redis.call('XPENDING', p, group, entry, entry, 1)
  if #pend == 0 or pend[1][2] ~= consumer then
    return redis.error_reply('NOTLEASED the delivery is no longer held by this consumer')
  end
end
local h = p .. ':ev:' .. id
if redis.call('EXISTS', h) == 0 then
  if leased then
    redis.call('XACK', p, group, entry)
    return {'gone'}
  end
  return redis.error_reply('NOTFOUND no event ' .. id)
end
local old = redis.call('HGET', h, 'status')
local finished_old = old == 'completed' or old == 'failed'
if mode == 'requeue' and not finished_old then
  return redis.error_reply('INVALIDSTATE ' .. old)
end
local new = ARGV[7]
if mode == 'release' then
  if finished_old then new = old else new = 'pending' end
end
if new ~= old then
  local score = redis.call('ZSCORE', p .. ':idx:all', id) or '0'
  redis.call('ZREM', p .. ':idx:status:' .. old, id)
  redis.call('ZADD', p .. ':idx:status:' .. new, score, id)
end
redis.call('HSET', h, 'status', new)
if ARGV[8] ~= '' then
  redis.call('HSET', h, 'state', ARGV[8])
end
if new == 'completed' or new == 'failed' then
  redis.call('ZADD', p .. ':idx:finished', ARGV[9], id)
  redis.call('EXPIRE', h, ARGV[10])
else
  redis.call('ZREM', p .. ':idx:finished', id)
  redis.call('PERSIST', h)
end
if leased then
  redis.call('XACK', p, group, entry)
end
if mode == 'complete' and new == 'failed' then
  local dead = redis.call('XADD', p .. ':dead', 'MAXLEN', '~', ARGV[14], '*',
    'id', id, 'group', group, 'error', ARGV[13])
  redis.call('HSET', h, 'dead', dead)
end
if mode == 'retry' or mode == 'release' then
  if tonumber(ARGV[11]) <= tonumber(ARGV[16]) then
    redis.call('XADD', p, '*', 'id', id, 'group', group, 'n', ARGV[12])
  else
    redis.call('ZADD', p .. ':delayed:' .. group, ARGV[11], ARGV[12] .. ':' .. id)
  end
end
if mode == 'requeue' then
  local dead = redis.call('HGET', h, 'dead')
  if dead then
    redis.call('XDEL', p .. ':dead', dead)
    redis.call('HDEL', h, 'dead')
  end
  redis.call('XADD', p, '*', 'id', id)
end
local state = redis.call('HGET', h, 'state') or 'null'
redis.call('PUBLISH', ARGV[15], '{"event":' .. redis.call('HGET', h, 'event') ..
  ',"status":"' .. new .. '","state":' .. state .. '}')
return {'ok', new}
"#;

/// Moves a group's due delayed redeliveries back into the stream, addressed to that group.
///
/// ARGV: stream, group, now (unix ms), most to move. Returns the next due time (unix ms) or nil.
const MOVE_DUE: &str = r#"
local p, group = ARGV[1], ARGV[2]
local z = p .. ':delayed:' .. group
local due = redis.call('ZRANGEBYSCORE', z, '-inf', ARGV[3], 'LIMIT', 0, tonumber(ARGV[4]))
for _, m in ipairs(due) do
  redis.call('ZREM', z, m)
  local sep = string.find(m, ':', 1, true)
  local n = string.sub(m, 1, sep - 1)
  local id = string.sub(m, sep + 1)
  if redis.call('EXISTS', p .. ':ev:' .. id) == 1 then
    redis.call('XADD', p, '*', 'id', id, 'group', group, 'n', n)
  end
end
local nxt = redis.call('ZRANGE', z, 0, 0, 'WITHSCORES')
if #nxt > 0 then return nxt[2] end
return false
"#;

/// Resets the idle time of an entry, only if this consumer still holds it.
///
/// ARGV: stream, group, consumer, entry id. Returns 1 if renewed, 0 if no longer held.
const KEEP_ALIVE: &str = r#"
local pend = redis.call('XPENDING', ARGV[1], ARGV[2], ARGV[4], ARGV[4], 1)
if #pend == 0 or pend[1][2] ~= ARGV[3] then return 0 end
redis.call('XCLAIM', ARGV[1], ARGV[2], ARGV[3], 0, ARGV[4], 'JUSTID')
return 1
"#;

/// Deletes an event and its index entries (also when the hash already expired).
///
/// ARGV: stream, id, then every status/source/all/finished index key. Returns 1 if the hash
/// existed.
const PRUNE: &str = r#"
local p, id = ARGV[1], ARGV[2]
local h = p .. ':ev:' .. id
local existed = redis.call('EXISTS', h)
local inst = redis.call('HGET', h, 'instance')
local dead = redis.call('HGET', h, 'dead')
redis.call('DEL', h)
for i = 3, #ARGV do redis.call('ZREM', ARGV[i], id) end
if inst then
  redis.call('ZREM', p .. ':idx:instance:' .. inst, id)
else
  for _, i in ipairs(redis.call('SMEMBERS', p .. ':instances')) do
    redis.call('ZREM', p .. ':idx:instance:' .. i, id)
  end
end
if dead then redis.call('XDEL', p .. ':dead', dead) end
return existed
"#;

/// Computes the safe trimming bound and trims: keep the newest `max_len` entries, but never
/// trim an entry at or after the oldest pending or not-yet-read entry of any group.
///
/// KEYS: stream, trim. ARGV: max_len. Returns the bound or nil when nothing needs trimming.
const TRIM: &str = r#"
local function parse(id)
  local d = string.find(id, '-', 1, true)
  return tonumber(string.sub(id, 1, d - 1)), tonumber(string.sub(id, d + 1))
end
local function less(a, b)
  local am, as = parse(a)
  local bm, bs = parse(b)
  return am < bm or (am == bm and as < bs)
end
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local maxlen = tonumber(ARGV[1])
if redis.call('XLEN', KEYS[1]) <= maxlen then
  redis.call('DEL', KEYS[2])
  return false
end
local groups = redis.call('XINFO', 'GROUPS', KEYS[1])
if #groups == 0 then return false end
local safe = nil
for _, g in ipairs(groups) do
  local name, last, pending
  for i = 1, #g, 2 do
    if g[i] == 'name' then name = g[i + 1]
    elseif g[i] == 'last-delivered-id' then last = g[i + 1]
    elseif g[i] == 'pending' then pending = g[i + 1] end
  end
  local bound = last
  if pending > 0 then
    local pend = redis.call('XPENDING', KEYS[1], name)
    if pend[2] and less(pend[2], bound) then bound = pend[2] end
  end
  if safe == nil or less(bound, safe) then safe = bound end
end
local newest = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', maxlen)
local bound = newest[#newest][1]
if less(safe, bound) then bound = safe end
redis.call('SET', KEYS[2], bound)
redis.call('XTRIM', KEYS[1], 'MINID', '~', bound)
return bound
"#;

/// Deletes consumers that hold no pending entries and are idle longer than a threshold (or are
/// the named consumer).
///
/// ARGV: stream, group ("" for every group), idle threshold ms, consumer name to delete when
/// empty ("" for none). Returns how many were deleted.
const DELETE_IDLE_CONSUMERS: &str = r#"
local removed = 0
local groups = {}
if ARGV[2] ~= '' then
  groups = {ARGV[2]}
else
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', ARGV[1])) do
    for i = 1, #g, 2 do if g[i] == 'name' then table.insert(groups, g[i + 1]) end end
  end
end
local threshold = tonumber(ARGV[3])
for _, group in ipairs(groups) do
  for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', ARGV[1], group)) do
    local name, pending, idle
    for i = 1, #c, 2 do
      if c[i] == 'name' then name = c[i + 1]
      elseif c[i] == 'pending' then pending = c[i + 1]
      elseif c[i] == 'idle' then idle = c[i + 1] end
    end
    if pending == 0 and (name == ARGV[4] or idle >= threshold) then
      redis.call('XGROUP', 'DELCONSUMER', ARGV[1], group, name)
      removed = removed + 1
    end
  end
end
return removed
"#;

/// The loaded scripts (each is sent by SHA, and its body only when the server lacks it).
pub(crate) struct Scripts {
    pub store: Script,
    pub outcome: Script,
    pub move_due: Script,
    pub keep_alive: Script,
    pub prune: Script,
    pub trim: Script,
    pub delete_idle_consumers: Script,
}

impl Scripts {
    pub(crate) fn new() -> Self {
        Scripts {
            store: Script::new(STORE),
            outcome: Script::new(OUTCOME),
            move_due: Script::new(MOVE_DUE),
            keep_alive: Script::new(KEEP_ALIVE),
            prune: Script::new(PRUNE),
            trim: Script::new(TRIM),
            delete_idle_consumers: Script::new(DELETE_IDLE_CONSUMERS),
        }
    }
}
