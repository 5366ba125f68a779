"""Optional framework integrations (imported lazily)."""
