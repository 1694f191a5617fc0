"""kwasm.sandboxer package."""
