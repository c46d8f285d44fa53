"""Parquet I/O, schema checks and Ray Data helpers."""
