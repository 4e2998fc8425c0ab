"""L2 planner: which parallel layout for a model on a cluster, by predicted memory and step time.

Pure cost math over the config and megaclm.model.flops (no torch.distributed, no processes):
`hardware` reads a hardware profile (JSON), `cost` predicts one layout's memory and step time,
`search` enumerates every layout megaclm accepts and ranks the ones that fit. tools/plan_layout.py is the CLI.
"""
