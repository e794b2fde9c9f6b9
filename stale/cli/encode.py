"""stale-encode: `stale-encode input=SHARDS out=DIR vae.pretrained=VAE frames=T size=S [buckets=...]` (docs/latent.md)."""

import shlex

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from stale.cli import packaged_config, stale_app


@stale_app("encode", flat_keys=packaged_config("encode"))
def main(cfg: DictConfig) -> None:
    from stale.latent.cache import encode_shards
    from stale.pipeline.sample_to_dir import resolve_device  # imported late so that --help and config errors are fast

    options = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    options["device"] = resolve_device(options["device"])
    pipeline, _, _ = options.pop("pipeline"), options.pop("model"), options.pop("sample")  # backbone=...: vae, text
    result = encode_shards(**options)
    if pipeline:  # the training command names the same backbone and pipeline, which also brings its transformer
        backbone = HydraConfig.get().runtime.choices.get("backbone")
        result["command"] = result["command"].replace(
            "stale-train ", f"stale-train backbone={backbone} pipeline={shlex.quote(str(pipeline))} ", 1
        )
    info = result["info"]
    print("\nstale-encode finished:")
    print(
        f"  clips          {info['clips']} in {len(info['shards'])} shards ({sum(info['skipped'].values())} "
        f"skipped: {info['skipped'] or 'none'})"
    )
    if info.get("per_bucket"):  # buckets=: one latent shape per bucket
        for name, b in info["per_bucket"].items():
            print(f"  bucket {name:<12} {b['clips']} clips, latent shape {b['latent_shape']}")
    else:
        print(
            f"  latent shape   {info['latent_shape']} per clip of {info['frames']} x {info['size']} x {info['size']} px"
        )
    print(f"  cache          {result['out']}")
    print(f"  train with     {result['command']}")


if __name__ == "__main__":
    main()
