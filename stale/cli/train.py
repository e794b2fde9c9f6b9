"""stale-train: `stale-train [hydra overrides]`, e.g. `stale-train model=s trainer=gpu`."""

import hydra
from omegaconf import DictConfig

from stale.cli import CONFIG_PATH


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def main(cfg: DictConfig) -> float | None:
    from stale.train import train  # imported late so that --help and config errors are fast

    metrics = train(cfg)
    return metrics.get("val/loss")  # the value Hydra sweepers minimise


if __name__ == "__main__":
    main()
