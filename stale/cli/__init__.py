"""Console entry points: thin @hydra.main apps over library functions."""

CONFIG_PATH = "pkg://stale.conf"  # conf/ is packaged as stale.conf (see pyproject.toml)
