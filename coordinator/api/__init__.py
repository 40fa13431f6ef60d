"""coordinator/api."""
