"""kwasm.api package."""
