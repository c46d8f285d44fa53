"""Ground-truth simulators, one module per kind. They write sharded parquet plus truth."""
