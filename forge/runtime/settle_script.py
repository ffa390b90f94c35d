"""The script that writes a batch's settlement in one command: its publishes, writes
and acks, atomically (a script runs alone, as a MULTI does), as one command for the
client to pack and one reply to parse."""

from __future__ import annotations

# One settlement, atomically (a script runs alone, as a MULTI does). Each command runs
# under pcall, so one that fails (a key of the wrong type, say) does not keep the rest
# from running, as in a MULTI; the first error is then the reply.
# KEYS: the stream of each publish, the key of each write, each acked stream.
# ARGV: publishes, writes, acked streams, group, maxlen, field; a payload per publish;
# value and expiry per write; per acked stream its number of ids, then the ids.
SETTLE_LUA = """
local publishes, writes, acked = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local group, maxlen, field = ARGV[4], ARGV[5], ARGV[6]
local a, failed = 7, nil
local function run(...)
  local reply = redis.pcall(...)
  if type(reply) == 'table' and reply.err and not failed then failed = reply end
end
for k = 1, publishes do
  run('XADD', KEYS[k], 'MAXLEN', '~', maxlen, '*', field, ARGV[a])
  a = a + 1
end
for k = publishes + 1, publishes + writes do
  run('SET', KEYS[k], ARGV[a], 'EX', ARGV[a + 1])
  a = a + 2
end
for k = publishes + writes + 1, publishes + writes + acked do
  local last = a + tonumber(ARGV[a])
  a = a + 1
  while a <= last do
    local upto = math.min(a + 999, last)  -- unpack's stack is bounded
    run('XACK', KEYS[k], group, unpack(ARGV, a, upto))
    a = upto + 1
  end
end
if failed then return failed end
return 1
"""
