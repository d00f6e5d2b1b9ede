"""File names and format version of a preprocessed dataset folder (shared by writer and reader),
and of its memory-mapped layout (written by :mod:`hstu.data.store` on first load)."""

FORMAT_VERSION = 1
SEQUENCES_FILE = "sequences.parquet"
ITEM_MAP_FILE = "item_map.parquet"
METADATA_FILE = "metadata.json"

MAPPED_VERSION = 1
"""Version of the mapped layout: part of its key, so a new layout never reads an old folder."""
MAPPED_PREFIX = ".mapped-"
"""The mapped layout of a dataset folder is ``<dataset>/.mapped-<key>/`` (a sibling
``.mapped-<key>.lock`` serialises its writing), or ``<cache>/<name>.mapped-<key>/`` where the
dataset folder is not writable."""
MAPPED_MANIFEST = "manifest.json"
CACHE_ENV = "HSTU_DATA_CACHE"
"""Environment variable: the cache folder for the mapped layouts of read-only dataset folders
(default ``~/.cache/hstu``)."""
