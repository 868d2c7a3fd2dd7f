"""The local output cache, one concept per module (bottom to top):

- `entry`: the entry format (what one target's run produced, small files
  inline), its validation and the cache key; the cache's errors.
- `objects`: content-addressed objects: atomic writes, copies with holes kept,
  verified downloads.
- `restore`: restoring an entry through a staging folder, and its cost check.
- `entrydb`: the entries as rows of `.mlbuild/cache/entries.db` (SQLite).
- `local`: `Cache`, the `.mlbuild/cache/` directory of objects and entries.
- `gc`: `mlbuild gc` and `mlbuild cache verify`.

The names below are what the rest of mlbuild imports, as `mlbuild.cache.X`.
"""

from __future__ import annotations

from mlbuild.cache.entry import (
    ENTRY_VERSION,
    INLINE_MAX,
    INLINE_TOTAL_MAX,
    MAX_BYTES,
    MAX_DEPTH,
    MAX_DURATION,
    MAX_ENTRY_BYTES,
    MAX_FUTURE,
    MAX_ITEMS,
    MAX_LINK_HOPS,
    MAX_NAME_BYTES,
    MAX_OUTPUTS,
    MAX_PATH_BYTES,
    MAX_TARGET_CHARS,
    MODE_BITS,
    BadEntry,
    CacheError,
    CorruptObject,
    Entry,
    Uncacheable,
    check_entry,
    describe_outputs,
    dir_mode_ok,
    entry_payload,
    file_mode_ok,
    is_digest,
    load_entry,
    parse_entry,
    portable_mode,
)
from mlbuild.cache.gc import GcReport, VerifyReport, collect_garbage, parse_size, verify_objects
from mlbuild.cache.local import Cache
from mlbuild.cache.objects import LARGE_FILE, commit, install_verified
from mlbuild.cache.restore import (
    RESTORE_BYTES_PER_SECOND,
    RESTORE_SECONDS_PER_FILE,
    RESTORE_SECONDS_PER_OTHER,
    SlowerThanRunning,
    clear_staging,
)
from mlbuild.manifest import cache_key

__all__ = [
    "ENTRY_VERSION",
    "INLINE_MAX",
    "INLINE_TOTAL_MAX",
    "LARGE_FILE",
    "MAX_BYTES",
    "MAX_DEPTH",
    "MAX_DURATION",
    "MAX_ENTRY_BYTES",
    "MAX_FUTURE",
    "MAX_ITEMS",
    "MAX_LINK_HOPS",
    "MAX_NAME_BYTES",
    "MAX_OUTPUTS",
    "MAX_PATH_BYTES",
    "MAX_TARGET_CHARS",
    "MODE_BITS",
    "RESTORE_BYTES_PER_SECOND",
    "RESTORE_SECONDS_PER_FILE",
    "RESTORE_SECONDS_PER_OTHER",
    "BadEntry",
    "Cache",
    "CacheError",
    "CorruptObject",
    "Entry",
    "GcReport",
    "SlowerThanRunning",
    "Uncacheable",
    "VerifyReport",
    "cache_key",
    "check_entry",
    "clear_staging",
    "collect_garbage",
    "commit",
    "describe_outputs",
    "dir_mode_ok",
    "entry_payload",
    "file_mode_ok",
    "install_verified",
    "is_digest",
    "load_entry",
    "parse_entry",
    "parse_size",
    "portable_mode",
    "verify_objects",
]
