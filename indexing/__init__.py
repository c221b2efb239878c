from indexing.sharded import ShardedIndex

__all__ = ["ShardedIndex"]
