"""coordinator/loops."""
