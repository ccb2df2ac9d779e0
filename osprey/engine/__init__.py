"""The region engine: continuous batching of region rows over image prefixes stored and read once per image."""

from osprey.engine.core import GroupRequest, RegionDecoder, RowRequest, TokenEvent
from osprey.engine.kv import KVPool, PoolSize, plan_pool
from osprey.engine.text import TextStream

__all__ = ["GroupRequest", "KVPool", "PoolSize", "RegionDecoder", "RowRequest", "TextStream", "TokenEvent", "plan_pool"]
