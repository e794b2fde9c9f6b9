"""stale-train: `stale-train [hydra overrides]`, e.g. `stale-train model=s trainer=gpu`."""

from omegaconf import DictConfig

from stale.cli import stale_app


@stale_app("train")
def main(cfg: DictConfig) -> float | None:
    from stale.train import train  # imported late so that --help and config errors are fast

    metrics = train(cfg)
    return metrics.get("val/loss")  # the value Hydra sweepers minimise


if __name__ == "__main__":
    main()
