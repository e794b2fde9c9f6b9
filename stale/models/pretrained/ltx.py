from stale.models.pretrained.backbone import PretrainedBackbone, family  # noqa: F401  (LTX: being written)
