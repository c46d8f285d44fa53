"""tune layer."""
