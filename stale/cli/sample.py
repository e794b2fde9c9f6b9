"""stale-sample: `stale-sample model=EXPORT_DIR out=DIR num_videos=8 steps=50 seed=0` (or `ckpt=PATH`)."""

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from stale.cli import packaged_config, stale_app

# `model` is also a config group of stale.conf (conf/model/*.yaml), and Hydra reads `model=DIR` as a choice in
# that group whenever the app's config path is stale.conf. So this app registers conf/sample.yaml in the
# ConfigStore and runs without a config path: there `model` is a plain key, as the command line promises.
CONFIG_NAME = "stale_sample"
CONFIG = packaged_config("sample")
ConfigStore.instance().store(name=CONFIG_NAME, node=CONFIG)


@stale_app(CONFIG_NAME, config_path=None, flat_keys=CONFIG)
def main(cfg: DictConfig) -> None:
    from stale.pipeline.sample_to_dir import sample_to_dir  # imported late so that --help and config errors are fast

    paths = sample_to_dir(**OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True))
    print("\nstale-sample finished. Outputs:")
    for name in ("gif", "contact_sheet", "record", "labels"):
        if name in paths:  # labels.json: class-conditional samples only
            print(f"  {name:<15} {paths[name]}")
    print(f"  {'mp4s':<15} {sum(k.startswith('mp4_') for k in paths)} in {paths['gif'].parent}")


if __name__ == "__main__":
    main()
