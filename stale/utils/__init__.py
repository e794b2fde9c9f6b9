"""Small helpers: media writing, provenance."""
