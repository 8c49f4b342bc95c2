"""The policy: its model, loading and validation, and the pure decider."""
