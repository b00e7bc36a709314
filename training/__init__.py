"""unmix pretraining: MoCo v2/v1, BYOL and SimCLR with the Un-Mix loss under DeepSpeed."""
