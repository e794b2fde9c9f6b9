"""stale-shards: `stale-shards input=DIR|manifest.csv|manifest.jsonl out=DIR [options]` or
`stale-shards synthetic out=DIR [frames=8 size=16 num_classes=4 train_clips=2048 ...]`.

Options are in conf/shards.yaml; the work is done by stale.data.shards (convert, write_synthetic).
"""

import sys

from omegaconf import DictConfig, OmegaConf

from stale.cli import packaged_config, stale_app

CONFIG = packaged_config("shards")
SYNTHETIC_KEYS = tuple(str(k) for k in CONFIG.synthetic)  # the bare keys `stale-shards synthetic ...` takes


class UsageError(ValueError):
    """A missing or unknown stale-shards argument."""


@stale_app("shards", flat_keys=CONFIG)
def _main(cfg: DictConfig) -> None:
    if cfg.mode not in ("convert", "synthetic"):
        raise UsageError(f"mode={cfg.mode!r}: use convert or synthetic")
    if cfg.mode == "convert" and not cfg.input:
        raise UsageError("input= is missing: a folder of videos, a manifest.csv or a manifest.jsonl")
    from stale.data import shards  # imported late (it pulls in torch via webdataset): usage errors are fast

    if cfg.mode == "synthetic":
        patterns = shards.write_synthetic(cfg.out, **OmegaConf.to_container(cfg.synthetic))
        print("stale-shards synthetic: wrote")
        for split, pattern in patterns.items():
            print(f"  {split:<6} {pattern}")
        return
    options = OmegaConf.to_container(cfg, resolve=True)
    options = {k: v for k, v in options.items() if k not in ("mode", "synthetic")}
    summary = shards.convert(shards.ShardsConfig(**options))
    print("\nstale-shards finished:")
    for split, s in summary["splits"].items():
        print(
            f"  {split:<6} {s['clips']:>7} clips in {s['shards']} shards from {s['videos']} videos "
            f"({s['failed_videos']} failed): {s['pattern']}"
        )
    if summary["failed"]:
        print(f"  {len(summary['failed'])} videos could not be used; see {cfg.out}/info.json")
    print(f"  train with: {summary['command']}")


def main() -> None:
    """`synthetic` as the first word selects the embedded dataset; its bare keys go under `synthetic.`."""
    argv = sys.argv
    if len(argv) > 1 and argv[1] == "synthetic":
        rest = [f"synthetic.{a}" if a.split("=", 1)[0] in SYNTHETIC_KEYS else a for a in argv[2:]]
        sys.argv = [argv[0], "mode=synthetic", *rest]
    _main()


if __name__ == "__main__":
    main()
