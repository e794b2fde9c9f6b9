"""stale-eval: `stale-eval samples=DIR real=PATTERN [ckpt=PATH] [i3d=PATH]`."""

import hydra
from omegaconf import DictConfig, OmegaConf

from stale.cli import CONFIG_PATH


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="eval")
def main(cfg: DictConfig) -> float:
    from stale.eval.evaluate import evaluate, summary_lines  # late import: config errors stay fast

    report = evaluate(**OmegaConf.to_container(cfg, resolve=True))
    print("\nstale-eval")
    for line in summary_lines(report):
        print(f"  {line}")
    return report["fdd"]["value"]


if __name__ == "__main__":
    main()
