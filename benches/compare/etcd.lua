-- wrk script for benches/compare/run.sh: drives etcd's v3 HTTP/JSON gateway.
--
--   wrk -t1 -c50 -d10s -s benches/compare/etcd.lua http://127.0.0.1:2379 -- MODE KEYS VALUE_SIZE
--
-- MODE: put     POST /v3/kv/put   on random keys (a SET)
--       range   POST /v3/kv/range on random keys (a GET; etcd's default, linearizable)
--       preload POST /v3/kv/put   on every key in order, round and round (run.sh stops
--               wrk once etcd holds every key)
-- Keys are `key:%012d` (16 bytes, as redis-benchmark's `key:__rand_int__`) over KEYS
-- keys; values are VALUE_SIZE bytes of 'x'. The gateway wants keys and values base64
-- encoded. Every request is built in init(), so request() costs a table lookup.

local bit = require("bit")
local chars = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

local function b64(s)
    local out = {}
    for i = 1, #s, 3 do
        local a, b, c = s:byte(i, i + 2)
        local n = bit.bor(bit.lshift(a, 16), bit.lshift(b or 0, 8), c or 0)
        local function ch(shift)
            local v = bit.band(bit.rshift(n, shift), 63)
            return chars:sub(v + 1, v + 1)
        end
        out[#out + 1] = ch(18) .. ch(12) .. (b and ch(6) or "=") .. (c and ch(0) or "=")
    end
    return table.concat(out)
end

local mode, keys
local requests = {}
local issued = 0

function init(args)
    mode = args[1] or "put"
    keys = tonumber(args[2] or "100000")
    local value = b64(string.rep("x", tonumber(args[3] or "100")))
    local headers = { ["Content-Type"] = "application/json" }
    for i = 0, keys - 1 do
        local key = b64(string.format("key:%012d", i))
        if mode == "range" then
            requests[i + 1] = wrk.format("POST", "/v3/kv/range", headers,
                '{"key":"' .. key .. '"}')
        elseif mode == "put" or mode == "preload" then
            requests[i + 1] = wrk.format("POST", "/v3/kv/put", headers,
                '{"key":"' .. key .. '","value":"' .. value .. '"}')
        else
            error("etcd.lua: unknown mode " .. mode .. " (put, range or preload)")
        end
    end
    math.randomseed(os.time())
end

function request()
    if mode == "preload" then
        issued = issued + 1
        return requests[((issued - 1) % keys) + 1]
    end
    return requests[math.random(keys)]
end
