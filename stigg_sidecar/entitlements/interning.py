"""The process-wide interning tables: one instance of what thousands of cached entries repeat.

A plan's feature definitions, its entitlement terms, the key order of its entitlement maps and
the instants its periods start and end repeat across every customer of the plan; each table keeps
one instance of each and hands it out again, so an entry pays only for what is its own. Every
table is bounded (past its bound new values are simply not shared) and only grows: a shared
object belongs to the whole process and is charged to no entry (`deep_size` skips it).

Parsing runs on the reactor; a race elsewhere could only store an equal value twice, which is
harmless. Pure otherwise: no I/O, no clock, no logging.
"""

from __future__ import annotations

import gc
import sys

from stigg_sidecar.entitlements.values import Feature

# Plan-level terms tuples (see compact.FeatureEntitlement). Bounded in bytes, and a large tuple
# (long enum values...) is never shared: each entry holding it is charged for it.
_SHARED_TERMS: dict[tuple, tuple] = {}
_SHARED_TERMS_MAX_BYTES = 16 << 20
_SHARED_TERM_MAX_BYTES = 1024
_shared_terms_bytes = 0

# Key -> position indexes of entitlement maps (see compact.FrozenMap).
_SHARED_INDEXES: dict[tuple[str, ...], dict[str, int]] = {}
_SHARED_INDEXES_MAX = 10_000

# Feature definitions: a plan's features repeat across thousands of customers, and their strings
# were half of an entry's memory.
_SHARED_FEATURES: dict[Feature, Feature] = {}
_SHARED_FEATURES_MAX = 100_000

# Period bounds and validity instants: month starts repeat across customers.
_SHARED_TIMES: dict[int, int] = {}
_SHARED_TIMES_MAX = 50_000


def shared_terms(terms: tuple) -> tuple:
    """The shared instance equal to `terms`, if it is small enough to share."""
    global _shared_terms_bytes
    existing = _SHARED_TERMS.get(terms)
    if existing is not None:
        return existing
    if _shared_terms_bytes < _SHARED_TERMS_MAX_BYTES:
        size = deep_size(terms)
        if size <= _SHARED_TERM_MAX_BYTES:
            _SHARED_TERMS[terms] = terms
            _shared_terms_bytes += size
    return terms


def is_shared_terms(terms: tuple) -> bool:
    return _SHARED_TERMS.get(terms) is terms


def shared_index(keys: tuple[str, ...]) -> dict[str, int]:
    """The key -> position index of `keys`, shared by every map with those keys in that order."""
    index = _SHARED_INDEXES.get(keys)
    if index is None:
        index = {k: i for i, k in enumerate(keys)}
        if len(_SHARED_INDEXES) < _SHARED_INDEXES_MAX:
            _SHARED_INDEXES[keys] = index
    return index


def is_shared_index(keys: tuple[str, ...], index: dict[str, int]) -> bool:
    return _SHARED_INDEXES.get(keys) is index


def shared_feature(feature: Feature) -> Feature:
    """The shared instance equal to `feature` (which becomes it, if it is the first)."""
    existing = _SHARED_FEATURES.get(feature)
    if existing is not None:
        return existing
    if len(_SHARED_FEATURES) < _SHARED_FEATURES_MAX:
        _SHARED_FEATURES[feature] = feature
    return feature


def is_shared_feature(obj: object) -> bool:
    return type(obj) is Feature and _SHARED_FEATURES.get(obj) is obj


def shared_time(value: int) -> int | None:
    """The process's instance of the instant `value` if it had one; else None, and `value`
    becomes it unless the table is full (the caller then uses its own instance)."""
    existing = _SHARED_TIMES.get(value)
    if existing is not None:
        return existing
    if len(_SHARED_TIMES) < _SHARED_TIMES_MAX:
        _SHARED_TIMES[value] = value
    return None


def is_shared_time(value: int) -> bool:
    return _SHARED_TIMES.get(value) is value


def deep_size(root: object) -> int:
    """Bytes held by `root` and everything it references, each object counted once.

    Follows `gc.get_referents`, which also sees through `MappingProxyType` to its dict. Classes,
    the None/True/False singletons and shared feature definitions belong to the whole process,
    not to one entry, so they are not counted.
    """
    return deep_size_unseen(root, set())


def deep_size_unseen(root: object, seen: set[int]) -> int:
    """`deep_size`, skipping (and adding to `seen`) the objects whose ids are in `seen`."""
    total = 0
    pending: list[object] = [root]
    while pending:
        fresh = []
        for obj in pending:
            if id(obj) in seen or isinstance(obj, type) or obj is None or obj is True or obj is False \
                    or is_shared_feature(obj):  # fmt: skip
                continue
            seen.add(id(obj))
            total += sys.getsizeof(obj)
            fresh.append(obj)
        pending = gc.get_referents(*fresh)
    return total
