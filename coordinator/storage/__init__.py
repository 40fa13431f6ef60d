"""coordinator/storage."""
