//! The Lua scripts of the Redis provider. Each runs atomically on the server, so a write that
//! touches the event hash, its indexes, the stream and the group's pending list is all or
//! nothing. Error replies carry a code word first (`DUPLICATE`, `NOTFOUND`, `NOTLEASED`,
//! `INVALIDSTATE`) that [`super::RedisProvider`] maps to [`eventbroker::provider::ProviderError`].
//!
//! Keys are built inside some scripts from the stream name (passed as an argument), so the
//! provider needs a single Redis primary (optionally with replicas or Sentinel), not Redis
//! Cluster.

use eventbroker::provider::statuses_kept_by_release;
use redis::Script;

/// Lua helpers shared by the scripts that read group states: `finished(status)`,
/// `status_in(h, g)` (the group's status, or the event's own one when the group has none),
/// `settled(p, h)` (every group of `p:groups` finished the event), `index_status(p, g, id,
/// old, new, score)` (moves the id from the group's `old` status index to its `new` one; from
/// every status index when `old` is nil) and `watched(channel)` (whether any client, on any
/// host, subscribes to the watch channel: a watch message is only built and published then).
const HELPERS: &str = r#"
local function finished(s) return s == 'completed' or s == 'failed' end
local function status_in(h, g)
  return redis.call('HGET', h, 'status:' .. g) or redis.call('HGET', h, 'status')
end
local function settled(p, h)
  for _, g in ipairs(redis.call('SMEMBERS', p .. ':groups')) do
    if not finished(status_in(h, g)) then return false end
  end
  return true
end
local STATUSES = {'pending', 'processing', 'completed', 'failed'}
local function index_status(p, g, id, old, new, score)
  if old == nil then
    for _, s in ipairs(STATUSES) do redis.call('ZREM', p .. ':gs:' .. g .. ':' .. s, id) end
  elseif old ~= new then
    redis.call('ZREM', p .. ':gs:' .. g .. ':' .. old, id)
  end
  redis.call('ZADD', p .. ':gs:' .. g .. ':' .. new, score, id)
end
local function watched(channel)
  return redis.call('PUBSUB', 'NUMSUB', channel)[2] > 0
end
local function parse_id(id)
  local d = string.find(id, '-', 1, true)
  return tonumber(string.sub(id, 1, d - 1)), tonumber(string.sub(id, d + 1))
end
local function less(a, b)
  local am, as = parse_id(a)
  local bm, bs = parse_id(b)
  return am < bm or (am == bm and as < bs)
end
"#;

/// Stores a new event (hash + indexes) and, when `deliver` is set, appends it to the stream.
/// The event's own status is its status in every group (`p:gs:{group}:{status}` of each group
/// of `p:groups`) until a group changes it.
///
/// KEYS: hash, stream, idx:all, idx:source:S, idx:instance:I, instances, idx:finished, trim.
/// ARGV: id, event json, status, state json, created score, deliver (0/1), finished score or
/// "", watch channel, source, instance.
const STORE: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then
  return redis.error_reply('DUPLICATE event ' .. ARGV[1] .. ' exists')
end
local p = KEYS[2]
redis.call('HSET', KEYS[1], 'event', ARGV[2], 'status', ARGV[3], 'state', ARGV[4],
  'source', ARGV[9], 'instance', ARGV[10])
redis.call('ZADD', KEYS[3], ARGV[5], ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[5], ARGV[1])
redis.call('ZADD', KEYS[5], ARGV[5], ARGV[1])
redis.call('SADD', KEYS[6], ARGV[10])
for _, g in ipairs(redis.call('SMEMBERS', p .. ':groups')) do
  redis.call('ZADD', p .. ':gs:' .. g .. ':' .. ARGV[3], ARGV[5], ARGV[1])
end
if ARGV[7] ~= '' then
  redis.call('ZADD', KEYS[7], ARGV[7], ARGV[1])
end
if ARGV[6] == '1' then
  local bound = redis.call('GET', KEYS[8])
  local entry
  if bound then
    entry = redis.call('XADD', p, 'MINID', '~', bound, '*', 'id', ARGV[1])
  else
    entry = redis.call('XADD', p, '*', 'id', ARGV[1])
  end
  redis.call('HSET', KEYS[1], 'entry', entry)
end
if watched(ARGV[8]) then
  redis.call('PUBLISH', ARGV[8],
    '{"event":' .. ARGV[2] .. ',"status":"' .. ARGV[3] .. '","state":' .. ARGV[4] .. '}')
end
return 1
"#;

/// Applies one status transition of one group, with whatever acknowledgement and redelivery
/// it implies.
///
/// ARGV: 1 stream (prefix of every key), 2 event id, 3 mode (`update`, `complete`, `retry`,
/// `release`, `requeue`), 4 group, 5 consumer, 6 stream entry id, 7 new status, 8 state json
/// (or "" to keep), 9 finished score, 10 (unused), 11 redelivery due (unix ms; 0 = now),
/// 12 deliveries so far (carried to the redelivered entry), 13 dead-letter error,
/// 14 dead-letter stream max length, 15 watch channel, 16 now (unix ms), 17 idle time (ms)
/// after which a delivery's lease counts as abandoned (requeue).
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
local old = status_in(h, group)
local unread = false
if mode == 'requeue' then
  -- Only the group's latest entry of the event can be pending in the group.
  local current = redis.call('HGET', h, 'entry:' .. group) or redis.call('HGET', h, 'entry')
  if current then
    local pend = redis.call('XPENDING', p, group, current, current, 1)
    if #pend > 0 then
      if tonumber(pend[1][3]) < tonumber(ARGV[17]) then
        return redis.error_reply('INVALIDSTATE ' .. old)
      end
      -- Abandoned: revoke the lease, so its holder can no longer acknowledge or extend it.
      redis.call('XACK', p, group, current)
    else
      for _, g in ipairs(redis.call('XINFO', 'GROUPS', p)) do
        local name, last
        for i = 1, #g, 2 do
          if g[i] == 'name' then name = g[i + 1]
          elseif g[i] == 'last-delivered-id' then last = g[i + 1] end
        end
        if name == group and less(last, current) then unread = true end
      end
    end
  end
  local delayed = redis.call('HGET', h, 'delayed:' .. group)
  if delayed then
    redis.call('ZREM', p .. ':delayed:' .. group, delayed)
    redis.call('HDEL', h, 'delayed:' .. group)
  end
end
local new = ARGV[7]
if mode == 'release' then
  if RELEASE_KEEPS[old] then new = old else new = 'pending' end
end
local score = redis.call('ZSCORE', p .. ':idx:all', id) or '0'
index_status(p, group, id, old, new, score)
redis.call('HSET', h, 'status:' .. group, new)
if ARGV[8] ~= '' then
  redis.call('HSET', h, 'state:' .. group, ARGV[8])
end
if settled(p, h) then
  redis.call('ZADD', p .. ':idx:finished', ARGV[9], id)
else
  redis.call('ZREM', p .. ':idx:finished', id)
end
redis.call('PERSIST', h)
if leased then
  redis.call('XACK', p, group, entry)
end
if mode == 'complete' and new == 'failed' then
  local dead = redis.call('XADD', p .. ':dead', 'MAXLEN', '~', ARGV[14], '*',
    'id', id, 'group', group, 'error', ARGV[13])
  redis.call('HSET', h, 'dead:' .. group, dead)
end
if mode == 'retry' or mode == 'release' then
  if tonumber(ARGV[11]) <= tonumber(ARGV[16]) then
    local again = redis.call('XADD', p, '*', 'id', id, 'group', group, 'n', ARGV[12])
    redis.call('HSET', h, 'entry:' .. group, again)
  else
    local member = ARGV[12] .. ':' .. id
    redis.call('ZADD', p .. ':delayed:' .. group, ARGV[11], member)
    redis.call('HSET', h, 'delayed:' .. group, member)
  end
end
if mode == 'requeue' then
  for _, field in ipairs({'dead:' .. group, 'dead'}) do
    local dead = redis.call('HGET', h, field)
    if dead then
      redis.call('XDEL', p .. ':dead', dead)
      redis.call('HDEL', h, field)
    end
  end
  if not unread then
    local again = redis.call('XADD', p, '*', 'id', id, 'group', group)
    redis.call('HSET', h, 'entry:' .. group, again)
  end
end
if watched(ARGV[15]) then
  local state = redis.call('HGET', h, 'state:' .. group) or redis.call('HGET', h, 'state') or 'null'
  redis.call('PUBLISH', ARGV[15], '{"event":' .. redis.call('HGET', h, 'event') ..
    ',"status":"' .. new .. '","state":' .. state .. ',"group":' .. cjson.encode(group) .. '}')
end
return {'ok', new}
"#;

/// Records `processing` for a fetched batch in one step: the claim is the mark, so a worker
/// does not write it with one more script per event. Each event is marked only when its
/// group status and state are still what the consumer loaded (a compare-and-set: a change
/// made meanwhile, such as a re-run, is left alone and the worker marks it as before).
///
/// ARGV: 1 stream (prefix of every key), 2 group, 3 watch channel, then per event four values:
/// id, expected status, expected state json ("" for none), new state json. Returns one 1
/// (marked) or 0 per event.
const CLAIM: &str = r#"
local p, group, channel = ARGV[1], ARGV[2], ARGV[3]
local marked = {}
local watching = watched(channel)
for i = 4, #ARGV, 4 do
  local id = ARGV[i]
  local h = p .. ':ev:' .. id
  local done = 0
  if redis.call('EXISTS', h) == 1 and status_in(h, group) == ARGV[i + 1] then
    local state = redis.call('HGET', h, 'state:' .. group) or redis.call('HGET', h, 'state') or ''
    if state == ARGV[i + 2] then
      local score = redis.call('ZSCORE', p .. ':idx:all', id) or '0'
      index_status(p, group, id, ARGV[i + 1], 'processing', score)
      redis.call('HSET', h, 'status:' .. group, 'processing', 'state:' .. group, ARGV[i + 3])
      redis.call('ZREM', p .. ':idx:finished', id)
      redis.call('PERSIST', h)
      if watching then
        redis.call('PUBLISH', channel, '{"event":' .. redis.call('HGET', h, 'event') ..
          ',"status":"processing","state":' .. ARGV[i + 3] .. ',"group":' ..
          cjson.encode(group) .. '}')
      end
      done = 1
    end
  end
  marked[#marked + 1] = done
end
return marked
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
  local h = p .. ':ev:' .. id
  if redis.call('EXISTS', h) == 1 then
    local again = redis.call('XADD', p, '*', 'id', id, 'group', group, 'n', n)
    redis.call('HSET', h, 'entry:' .. group, again)
    if redis.call('HGET', h, 'delayed:' .. group) == m then
      redis.call('HDEL', h, 'delayed:' .. group)
    end
  end
end
local nxt = redis.call('ZRANGE', z, 0, 0, 'WITHSCORES')
if #nxt > 0 then return nxt[2] end
return false
"#;

/// Indexes the states of a group (`p:gs:{group}:{status}`) for a page of stored events, in
/// `idx:all` order: done once for each group, after it was added to `p:groups` (from then
/// on, every write keeps its index). Events the group has not finished are no longer
/// settled.
///
/// ARGV: stream, group, first rank, page size. Returns how many ids the page had.
const INDEX_GROUP: &str = r#"
local p, group = ARGV[1], ARGV[2]
local first = tonumber(ARGV[3])
local page = redis.call('ZRANGE', p .. ':idx:all', first, first + tonumber(ARGV[4]) - 1,
  'WITHSCORES')
for i = 1, #page, 2 do
  local id, score = page[i], page[i + 1]
  local h = p .. ':ev:' .. id
  if redis.call('EXISTS', h) == 1 then
    local status = status_in(h, group)
    index_status(p, group, id, nil, status, score)
    if not finished(status) then
      redis.call('ZREM', p .. ':idx:finished', id)
      redis.call('PERSIST', h)
    end
  end
end
return #page / 2
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

/// Deletes an event and its index entries (also when the hash already expired); with the
/// settled flag, only if every group finished it (otherwise it leaves the finished index
/// until it settles).
///
/// ARGV: stream, id, settled flag (1/0), then every status/source/all/finished index key.
/// Returns 1 if the hash existed, 0 if not, -1 if it was kept because a group has not
/// finished it.
const PRUNE: &str = r#"
local p, id = ARGV[1], ARGV[2]
local h = p .. ':ev:' .. id
local existed = redis.call('EXISTS', h)
if existed == 1 and ARGV[3] == '1' and not settled(p, h) then
  redis.call('ZREM', p .. ':idx:finished', id)
  return -1
end
local inst = redis.call('HGET', h, 'instance')
for _, field in ipairs(redis.call('HKEYS', h)) do
  if field == 'dead' or string.sub(field, 1, 5) == 'dead:' then
    redis.call('XDEL', p .. ':dead', redis.call('HGET', h, field))
  end
end
redis.call('DEL', h)
for i = 4, #ARGV do redis.call('ZREM', ARGV[i], id) end
for _, g in ipairs(redis.call('SMEMBERS', p .. ':groups')) do
  for _, s in ipairs(STATUSES) do redis.call('ZREM', p .. ':gs:' .. g .. ':' .. s, id) end
end
if inst then
  redis.call('ZREM', p .. ':idx:instance:' .. inst, id)
else
  for _, i in ipairs(redis.call('SMEMBERS', p .. ':instances')) do
    redis.call('ZREM', p .. ':idx:instance:' .. i, id)
  end
end
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

/// Writes a handler record if its revision is the expected one (compare-and-set), taking the
/// new revision from the store's counter so revisions of a name grow across a delete and
/// re-create, and publishes the change.
///
/// KEYS: records hash, revisions hash, revision counter. ARGV: name, record json, expected
/// revision ("" for "no record"), change channel. Returns the new revision, or 0 on a conflict.
const WRITE_RECORD: &str = r#"
local current = redis.call('HGET', KEYS[2], ARGV[1])
if ARGV[3] == '' then
  if current then return 0 end
elseif current ~= ARGV[3] then
  return 0
end
local revision = redis.call('INCR', KEYS[3])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], revision)
redis.call('PUBLISH', ARGV[4], ARGV[1])
return revision
"#;

/// Deletes a handler record if its revision is the expected one, and publishes the change.
///
/// KEYS: records hash, revisions hash. ARGV: name, expected revision, change channel. Returns
/// 1 if deleted, 0 on a conflict or when there is no record.
const DELETE_RECORD: &str = r#"
if redis.call('HGET', KEYS[2], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('PUBLISH', ARGV[3], ARGV[1])
return 1
"#;

/// Removes hosts from the set of reporting hosts whose report expired, unless the host
/// reported again meanwhile.
///
/// KEYS: hosts set, then the report key of each host. ARGV: the host names, in the same
/// order. Returns how many were removed.
const DROP_EXPIRED_HOSTS: &str = r#"
local removed = 0
for i = 1, #ARGV do
  if redis.call('EXISTS', KEYS[i + 1]) == 0 then
    removed = removed + redis.call('SREM', KEYS[1], ARGV[i])
  end
end
return removed
"#;

/// Lua helpers of the key-value scripts. `usage_of(usage, ns)` is the namespace's byte usage
/// (the key count is `HLEN` of its hash); `refusal(keys, bytes, key, old, new, max_keys,
/// max_bytes)` is nil when a namespace holding `keys` keys and `bytes` bytes may replace the
/// value of `key` (`old` bytes long, nil when absent) by one of `new` bytes, and otherwise the
/// error reply `QUOTA keys bytes old new` (old -1 when absent), from which the host builds
/// the message ([`eventbroker::keyvalue::Usage::admit`] decides the same way). Byte counts
/// stay far below 2^53, so Lua's doubles hold them exactly; `%d` formats them without an
/// exponent.
const KV_HELPERS: &str = r#"
local function usage_of(usage, ns)
  return tonumber(redis.call('HGET', usage, ns) or '0')
end
local function refusal(keys, bytes, key, old, new, max_keys, max_bytes)
  local after_keys, after_bytes = keys, bytes + new
  if old then
    after_bytes = math.max(after_bytes - old, 0)
  else
    after_keys = keys + 1
    after_bytes = after_bytes + #key
  end
  if (after_keys > keys and after_keys > tonumber(max_keys))
    or (after_bytes > bytes and after_bytes > tonumber(max_bytes)) then
    return redis.error_reply(string.format('QUOTA %d %d %d %d', keys, bytes, old or -1, new))
  end
  return nil
end
"#;

/// Sets a key of a key-value namespace, unless that passes the namespace's quota, and
/// adjusts its byte usage.
///
/// KEYS: namespace hash, usage hash. ARGV: namespace id, key, value, max keys, max bytes.
/// Returns 1, or a `QUOTA` error reply (nothing written).
const KV_SET: &str = r#"
local h, usage, ns, key, value = KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3]
local old = nil
if redis.call('HEXISTS', h, key) == 1 then old = redis.call('HSTRLEN', h, key) end
local refused = refusal(redis.call('HLEN', h), usage_of(usage, ns), key, old, #value,
  ARGV[4], ARGV[5])
if refused then return refused end
redis.call('HSET', h, key, value)
redis.call('HINCRBY', usage, ns, #value - (old or -#key))
return 1
"#;

/// Deletes a key of a key-value namespace and adjusts its byte usage (dropping it with the
/// namespace's last key).
///
/// KEYS: namespace hash, usage hash. ARGV: namespace id, key. Returns 1 if the key existed.
const KV_DELETE: &str = r#"
local h, usage, ns, key = KEYS[1], KEYS[2], ARGV[1], ARGV[2]
local old = redis.call('HSTRLEN', h, key)
if redis.call('HDEL', h, key) == 0 then return 0 end
if redis.call('EXISTS', h) == 0 then
  redis.call('HDEL', usage, ns)
else
  redis.call('HINCRBY', usage, ns, -(#key + old))
end
return 1
"#;

/// Adds a delta to the decimal number at a key of a key-value namespace with `HINCRBY` (Lua
/// never does the arithmetic: its numbers are doubles), unless creating or growing the value
/// passes the quota, and adjusts the byte usage by the value's length before and after. A
/// value grown past the byte quota is put back, so a refusal changes nothing.
///
/// KEYS: namespace hash, usage hash. ARGV: namespace id, key, delta (decimal, at most
/// 2^63 - 1), max keys, max bytes. Returns the new value as text, or an error reply: `QUOTA`,
/// `NOTANUMBER text` (the value is not a decimal number Redis can increment) or `NOTANUMBER
/// overflow` (the sum passes 2^63 - 1); nothing is written on an error.
const KV_INCREMENT: &str = r#"
local h, usage, ns, key, delta = KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3]
local keys, bytes = redis.call('HLEN', h), usage_of(usage, ns)
local old = redis.call('HGET', h, key)
if old and not string.match(old, '^%d+$') then
  return redis.error_reply('NOTANUMBER text')
end
if not old then
  local refused = refusal(keys, bytes, key, nil, #delta, ARGV[4], ARGV[5])
  if refused then return refused end
end
local done = redis.pcall('HINCRBY', h, key, delta)
if type(done) == 'table' and done.err then
  if string.find(done.err, 'overflow', 1, true) then
    return redis.error_reply('NOTANUMBER overflow')
  end
  if string.find(done.err, 'not an integer', 1, true) then
    return redis.error_reply('NOTANUMBER text')
  end
  return done
end
local value = redis.call('HGET', h, key)
if old then
  local refused = refusal(keys, bytes, key, #old, #value, ARGV[4], ARGV[5])
  if refused then
    redis.call('HSET', h, key, old)
    return refused
  end
  redis.call('HINCRBY', usage, ns, #value - #old)
else
  redis.call('HINCRBY', usage, ns, #key + #value)
end
return value
"#;

/// One `HSCAN` step over a key-value namespace, returning only the keys (Redis 7.0 has no
/// `HSCAN … NOVALUES`; the values stay on the server).
///
/// KEYS: namespace hash. ARGV: cursor, count. Returns `{next cursor, keys}`.
const KV_LIST: &str = r#"
local reply = redis.call('HSCAN', KEYS[1], ARGV[1], 'COUNT', ARGV[2])
local keys = {}
for i = 1, #reply[2], 2 do keys[#keys + 1] = reply[2][i] end
return {reply[1], keys}
"#;

/// The loaded scripts (each is sent by SHA, and its body only when the server lacks it).
pub(crate) struct Scripts {
    pub store: Script,
    pub outcome: Script,
    pub claim: Script,
    pub move_due: Script,
    pub index_group: Script,
    pub keep_alive: Script,
    pub prune: Script,
    pub trim: Script,
    pub delete_idle_consumers: Script,
    pub write_record: Script,
    pub delete_record: Script,
    pub drop_expired_hosts: Script,
    pub kv_set: Script,
    pub kv_delete: Script,
    pub kv_increment: Script,
    pub kv_list: Script,
}

/// The core's release rule ([`statuses_kept_by_release`]) as a Lua set, for [`OUTCOME`].
fn release_rule() -> String {
    let kept: Vec<String> = statuses_kept_by_release()
        .map(|status| format!("{} = true", status.as_str()))
        .collect();
    format!("local RELEASE_KEEPS = {{{}}}\n", kept.join(", "))
}

impl Scripts {
    pub(crate) fn new() -> Self {
        Scripts {
            store: Script::new(&format!("{HELPERS}{STORE}")),
            outcome: Script::new(&format!("{}{HELPERS}{OUTCOME}", release_rule())),
            claim: Script::new(&format!("{HELPERS}{CLAIM}")),
            move_due: Script::new(MOVE_DUE),
            index_group: Script::new(&format!("{HELPERS}{INDEX_GROUP}")),
            keep_alive: Script::new(KEEP_ALIVE),
            prune: Script::new(&format!("{HELPERS}{PRUNE}")),
            trim: Script::new(TRIM),
            delete_idle_consumers: Script::new(DELETE_IDLE_CONSUMERS),
            write_record: Script::new(WRITE_RECORD),
            delete_record: Script::new(DELETE_RECORD),
            drop_expired_hosts: Script::new(DROP_EXPIRED_HOSTS),
            kv_set: Script::new(&format!("{KV_HELPERS}{KV_SET}")),
            kv_delete: Script::new(KV_DELETE),
            kv_increment: Script::new(&format!("{KV_HELPERS}{KV_INCREMENT}")),
            kv_list: Script::new(KV_LIST),
        }
    }
}
