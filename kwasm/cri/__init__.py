"""kwasm.cri package."""
