"""stale-export: `stale-export ckpt=PATH out=DIR [weights=ema|raw] [onnx=true] [torch_export=true]`."""

from omegaconf import DictConfig, OmegaConf

from stale.cli import packaged_config, stale_app


@stale_app("export", flat_keys=packaged_config("export"))
def main(cfg: DictConfig) -> None:
    from stale.export.export import export_checkpoint  # imported late so that --help and config errors are fast

    result = export_checkpoint(**OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True))
    print("\nstale-export finished. Outputs:")
    for name, path in result["paths"].items():
        print(f"  {name:<18} {path}")
    for name, value in result["checks"].items():
        print(f"  {name:<18} {value:.3g}")


if __name__ == "__main__":
    main()
