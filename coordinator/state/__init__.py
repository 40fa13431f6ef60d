"""coordinator/state."""
