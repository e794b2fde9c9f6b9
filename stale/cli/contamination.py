"""stale-contamination: `stale-contamination train=PATTERN test=PATTERN out=FILE [threshold=8]`."""

from omegaconf import DictConfig, OmegaConf

from stale.cli import packaged_config, stale_app


@stale_app("contamination", flat_keys=packaged_config("contamination"))
def main(cfg: DictConfig) -> int:
    from stale.eval.contamination import check_contamination  # late import: config errors stay fast

    kwargs = OmegaConf.to_container(cfg, resolve=True)
    report = check_contamination(**kwargs)
    c, clean = report["counts"], report["clean_test"]
    print(
        f"\nstale-contamination: {report['train']['clips']} train clips x {report['test']['clips']} test clips, "
        f"threshold {cfg.threshold}"
    )
    print(f"  train-test pairs     {c['train_test']} ({c['contaminated_test_clips']} test clips)")
    if cfg.within:
        print(f"  within train / test  {c['within_train']} / {c['within_test']}")
    print(
        f"  clean test set       {clean['clips_kept']} clips kept, {clean['clips_removed']} removed "
        f"({clean['mode']}): {clean['list']}"
    )
    print(f"  report               {cfg.out}")
    return c["train_test"]


if __name__ == "__main__":
    main()
