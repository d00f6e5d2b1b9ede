"""File names and format version of a preprocessed dataset folder (shared by writer and reader)."""

FORMAT_VERSION = 1
SEQUENCES_FILE = "sequences.parquet"
ITEM_MAP_FILE = "item_map.parquet"
METADATA_FILE = "metadata.json"
