"""unmix pretraining: MoCo v2 / BYOL with the Un-Mix loss under DeepSpeed."""
