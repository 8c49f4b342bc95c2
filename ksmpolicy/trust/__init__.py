"""Trust domains: merge scopes, the active domain of each, the memory guard, the shared state."""
