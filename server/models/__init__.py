"""Model implementations, their registry and the checkpoint loader."""
