"""The outcome join's fleet-wide store in Redis (router.state.outcomes describes the join).
Only deployments with Redis import it."""

from __future__ import annotations

from collections.abc import Sequence

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from router.state.outcomes import CLAIM_CHUNK, GRACE_SHARE, Claimed, Served
from router.state.store import StoreUnavailable

# KEYS: outcome:<model>:<id> per label; ARGV: now (s), horizon (s), then one label per key.
# Answers per key: result, version, value (empty strings unless accepted).
CLAIM_LABELS = """
local now = tonumber(ARGV[1])
local horizon = tonumber(ARGV[2])
local out = {}
for i = 1, #KEYS do
  local r = redis.call('HMGET', KEYS[i], 'v', 's', 't', 'l')
  local label = ARGV[i + 2]
  local result, version, value = 'unknown', '', ''
  if r[1] then
    if now - tonumber(r[3]) > horizon then
      result = 'expired'
    elseif r[4] then
      if r[4] == label then result = 'duplicate' else result = 'conflict' end
    else
      redis.call('HSET', KEYS[i], 'l', label)
      result, version, value = 'accepted', r[1], r[2]
    end
  end
  out[#out + 1] = result
  out[#out + 1] = version
  out[#out + 1] = value
end
return out
"""


# KEYS: outcome:<model>:<id> per prediction; ARGV: ttl in ms, then one string of a line per key,
# "version value served-at" (versions are digits, the numbers Python reprs: no space inside).
# A prediction served again keeps the label its id took.
REMEMBER = """
local ttl = ARGV[1]
local i = 0
for version, value, at in string.gmatch(ARGV[2], '(%S+) (%S+) (%S+)\\n') do
  i = i + 1
  redis.call('HSET', KEYS[i], 'v', version, 's', value, 't', at)
  redis.call('PEXPIRE', KEYS[i], ttl)
end
return i
"""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisPredictions:
    """Keys ``<prefix>outcome:<model>:<id>``: a hash of v (version), s (value), t (served at,
    Unix seconds) and l (the label, once taken), expiring after the horizon and its grace."""

    def __init__(self, url: str, prefix: str, horizon_s: float, timeout_s: float = 1.0) -> None:
        self.horizon_s = horizon_s
        self._keep_ms = max(1, round(horizon_s * (1.0 + GRACE_SHARE) * 1000))
        self._prefix = prefix
        self._redis = Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
        self._claim = self._redis.register_script(CLAIM_LABELS)
        self._remember = self._redis.register_script(REMEMBER)

    def _key(self, model: str, request_id: str) -> str:
        return f"{self._prefix}outcome:{model}:{request_id}"

    async def remember(self, served: Sequence[Served]) -> None:
        """One script per 1,000 predictions: a command with many arguments costs the client far
        less to encode than two commands per prediction in a pipeline (about 10 µs each)."""
        for start in range(0, len(served), CLAIM_CHUNK):
            chunk = served[start : start + CLAIM_CHUNK]
            keys = [self._key(s.model, s.request_id) for s in chunk]
            lines = "".join([f"{s.version} {s.value!r} {s.at!r}\n" for s in chunk])
            try:
                await self._remember(keys=keys, args=[self._keep_ms, lines])
            except RedisError as exc:
                raise StoreUnavailable(f"redis: {exc}") from exc

    async def claim(
        self, model: str, labels: Sequence[tuple[str, float]], now: float
    ) -> list[Claimed]:
        out: list[Claimed] = []
        for start in range(0, len(labels), CLAIM_CHUNK):
            chunk = labels[start : start + CLAIM_CHUNK]
            keys = [self._key(model, request_id) for request_id, _ in chunk]
            args = [repr(now), repr(self.horizon_s), *(repr(label) for _, label in chunk)]
            try:
                answer = await self._claim(keys=keys, args=args)
            except RedisError as exc:
                raise StoreUnavailable(f"redis: {exc}") from exc
            for i in range(0, len(answer), 3):
                result = _text(answer[i])
                if result == "accepted":
                    out.append(
                        Claimed("accepted", _text(answer[i + 1]), float(_text(answer[i + 2])))
                    )
                else:
                    out.append(Claimed(result))  # type: ignore[arg-type]
        return out

    async def close(self) -> None:
        await self._redis.aclose()
