-- DRF feature queue: push one batch for every modality, evict beyond K, keep moments consistent.
-- Atomic (one script); validates everything before the first write, because Redis does not roll a
-- script back when it fails half way.
--
-- KEYS[1]      moments hash: <m>:n (int), <m>:dim (int), <m>:sum, <m>:sumsq (packed little-endian doubles)
-- KEYS[2]      seeded flag (used only in mode "seed")
-- KEYS[2+g]    list of float32 vectors of the g-th modality group (oldest at the head)
-- ARGV[1]      K, the bound on each list
-- ARGV[2]      mode: "push" | "seed" (only if the flag is not set yet; sets it) | "reseed" (sets it regardless:
--              the queue was lost or cut short, e.g. Redis restarted without persistence)
-- ARGV[3]      number of modality groups G
-- then per group: name, n, dim, sum of the pushed vectors, sum of their squares (packed doubles,
-- computed by the client so Lua only unpacks what it evicts), then the n vectors.
-- Returns: 0 when mode "seed" found the flag set; otherwise the list length of each group.

local K = tonumber(ARGV[1])
local mode = ARGV[2]
local G = tonumber(ARGV[3])
local H = KEYS[1]

local groups = {}
local a = 4
for g = 1, G do
    local grp = {name = ARGV[a], n = tonumber(ARGV[a + 1]), dim = tonumber(ARGV[a + 2]),
                 psum = ARGV[a + 3], psumsq = ARGV[a + 4], first = a + 5, key = KEYS[2 + g]}
    a = a + 5 + grp.n
    if #grp.psum ~= 8 * grp.dim or #grp.psumsq ~= 8 * grp.dim then
        return redis.error_reply('ERR feature_queue: bad moments for ' .. grp.name)
    end
    for i = grp.first, grp.first + grp.n - 1 do
        if #ARGV[i] ~= 4 * grp.dim then
            return redis.error_reply('ERR feature_queue: vector of ' .. grp.name .. ' is not ' .. grp.dim .. '-d')
        end
    end
    local stored = redis.call('HGET', H, grp.name .. ':dim')
    if stored and tonumber(stored) ~= grp.dim then
        return redis.error_reply('ERR feature_queue: ' .. grp.name .. ' is ' .. stored .. '-d, got ' .. grp.dim)
    end
    groups[g] = grp
end

if mode == 'seed' and not redis.call('SET', KEYS[2], '1', 'NX') then
    return 0
end
if mode == 'reseed' then
    redis.call('SET', KEYS[2], '1')
end

local lengths = {}
for g = 1, G do
    local grp = groups[g]
    local dim = grp.dim
    local fmt_d = '<' .. string.rep('d', dim)
    local fmt_f = '<' .. string.rep('f', dim)
    -- RPUSH in chunks: Lua's unpack() is limited to a few thousand values.
    local i = grp.first
    local last = grp.first + grp.n - 1
    while i <= last do
        local j = math.min(i + 999, last)
        redis.call('RPUSH', grp.key, unpack(ARGV, i, j))
        i = j + 1
    end
    local len = redis.call('LLEN', grp.key)
    local evicted = {}
    if len > K then
        -- LRANGE + LTRIM, not `LPOP key count`: that form needs Redis 6.2, and on older servers the script
        -- failed here after its RPUSH, half-applied, leaving the list to grow without bound.
        evicted = redis.call('LRANGE', grp.key, 0, len - K - 1)
        redis.call('LTRIM', grp.key, len - K, -1)
        len = K
    end
    local cur = redis.call('HMGET', H, grp.name .. ':sum', grp.name .. ':sumsq')
    local s, q
    if cur[1] and cur[2] then
        s = {struct.unpack(fmt_d, cur[1])}
        q = {struct.unpack(fmt_d, cur[2])}
    else
        s, q = {}, {}
        for d = 1, dim do s[d] = 0.0; q[d] = 0.0 end
    end
    local ps = {struct.unpack(fmt_d, grp.psum)}
    local pq = {struct.unpack(fmt_d, grp.psumsq)}
    for d = 1, dim do
        s[d] = s[d] + ps[d]
        q[d] = q[d] + pq[d]
    end
    for _, v in ipairs(evicted) do
        local x = {struct.unpack(fmt_f, v)}
        for d = 1, dim do
            local xd = x[d]
            s[d] = s[d] - xd
            q[d] = q[d] - xd * xd
        end
    end
    redis.call('HSET', H, grp.name .. ':n', len, grp.name .. ':dim', dim,
               grp.name .. ':sum', struct.pack(fmt_d, unpack(s, 1, dim)),
               grp.name .. ':sumsq', struct.pack(fmt_d, unpack(q, 1, dim)))
    lengths[g] = len
end
return lengths
