"""L0 utilities: no torch.distributed, no deepspeed."""
