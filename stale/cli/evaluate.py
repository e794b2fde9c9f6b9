"""stale-eval: `stale-eval samples=DIR real=PATTERN [ckpt=PATH] [i3d=PATH]`."""

from omegaconf import DictConfig, OmegaConf

from stale.cli import packaged_config, stale_app


@stale_app("eval", flat_keys=packaged_config("eval"))
def main(cfg: DictConfig) -> float:
    from stale.eval.evaluate import evaluate, summary_lines  # late import: config errors stay fast

    report = evaluate(**OmegaConf.to_container(cfg, resolve=True))
    print("\nstale-eval")
    for line in summary_lines(report):
        print(f"  {line}")
    return report["fdd"]["value"]


if __name__ == "__main__":
    main()
