"""kwasm.image package."""
