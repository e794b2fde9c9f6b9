"""Text conditioning: captions from shards, text encoders (docs/text.md)."""
