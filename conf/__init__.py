"""Hydra configs of the stale commands, packaged as stale.conf."""
