"""L2 model: the GPT family (megaclm.model.gpt), its pipeline form (megaclm.model.pipe, imported on
demand: it pulls in deepspeed.pipe) and tensor-parallel state-dict sharding (megaclm.model.sharding)."""
from megaclm.model.gpt import GPTModel
from megaclm.model.sharding import shard_state_dict, tp_partition, unshard_state_dicts

__all__ = ["GPTModel", "shard_state_dict", "tp_partition", "unshard_state_dicts"]
