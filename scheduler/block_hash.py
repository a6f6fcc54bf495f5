"""Content addresses of full KV blocks, the prefix cache's keys.

A block's hash covers everything its K/V depends on: every token before it (through
its parent's hash), its own tokens, and extra keys that change the K/V or who may
see it. A request's hashes form a chain:

    ROOT ─► hash(ROOT, tokens[0:B], ("cache_salt", salt)) ─► hash(h0, tokens[B:2B]) ─► ...
            block 0 (the salt, if any, only here)             block 1

so a salt on the first block separates the whole chain: two tenants with different
salts never share a block, even for the same tokens. Only full blocks are hashed.

SHA-256 over a fixed byte encoding (never Python's ``hash()``, which is salted per
process): the same tokens give the same hashes in every process and every release of
this module, so other processes (a gateway routing to the replica that holds a
prefix) can compute them too.
"""

from __future__ import annotations

import functools
import hashlib
import struct
from collections.abc import Callable, Sequence

# The parent of a request's first block; the version names this encoding.
ROOT_HASH = hashlib.sha256(b"tessera prefix cache, block hash v1").digest()

ExtraKey = tuple[str, str]  # (kind, value), e.g. ("cache_salt", "tenant-a")


def hash_block(
    parent_hash: bytes, token_ids: Sequence[int], extra_keys: Sequence[ExtraKey] = ()
) -> bytes:
    """The hash of one full block, given its parent's (ROOT_HASH for the first)."""
    return _hash(parent_hash, _tokens_struct(len(token_ids)).pack, token_ids, extra_keys)


def _hash(
    parent_hash: bytes,
    pack_tokens: Callable[..., bytes],
    token_ids: Sequence[int],
    extra_keys: Sequence[ExtraKey],
) -> bytes:
    # Little-endian: a count, then each token as a signed 64-bit integer; then the
    # extra keys (_encode_keys). One buffer, one sha256 call: blocks are hashed in
    # every step (each block a request fills, every prompt block at admission).
    keys = _encode_keys(extra_keys) if extra_keys else _NO_KEYS
    tokens = pack_tokens(len(token_ids), *token_ids)
    return hashlib.sha256(parent_hash + tokens + keys).digest()


def _encode_keys(extra_keys: Sequence[ExtraKey]) -> bytes:
    """A count, then each key's kind and value, length-prefixed: no ambiguity."""
    parts = [struct.pack("<I", len(extra_keys))]
    for kind, value in extra_keys:
        for part in (kind.encode(), value.encode()):
            parts += (struct.pack("<I", len(part)), part)
    return b"".join(parts)


_NO_KEYS = _encode_keys(())


@functools.lru_cache(maxsize=64)
def _tokens_struct(num_tokens: int) -> struct.Struct:
    return struct.Struct(f"<I{num_tokens}q")


def extra_keys(block_index: int, cache_salt: str) -> tuple[ExtraKey, ...]:
    """What a block's hash covers besides tokens: the salt, in the first block only.

    The place for more keys later (an adapter's name, an image's hash for the blocks
    that hold its tokens)."""
    if block_index == 0 and cache_salt:
        return (("cache_salt", cache_salt),)
    return ()


def extend_block_hashes(
    block_hashes: list[bytes], token_ids: Sequence[int], block_size: int, cache_salt: str = ""
) -> None:
    """Append the hashes of the full blocks of token_ids that block_hashes lacks.

    block_hashes holds the hashes of the first len(block_hashes) blocks already (the
    tokens only ever grow), so each block is hashed once.
    """
    first, end = len(block_hashes), len(token_ids) // block_size
    if first >= end:
        return
    parent = block_hashes[-1] if block_hashes else ROOT_HASH
    pack_tokens = _tokens_struct(block_size).pack
    sha256 = hashlib.sha256
    for index in range(first, end):  # _hash, inline: a decode hashes a block this way
        start = index * block_size
        keys = extra_keys(index, cache_salt)
        tokens = pack_tokens(block_size, *token_ids[start : start + block_size])
        parent = sha256(parent + tokens + (_encode_keys(keys) if keys else _NO_KEYS)).digest()
        block_hashes.append(parent)
