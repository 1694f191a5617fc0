"""kwasm.runtime package."""
