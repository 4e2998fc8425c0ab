"""LoRA adapters start the same at any layout: init_adapters draws each A whole from the run's seed and the
adapter's GPTModel name (not from wherever the default generator stands after the layers built before it), and
a row-parallel A keeps its rank's columns of that whole draw. Found by the layout fuzzer: at PP=2 the second
stage's adapters started differently from PP=1's (tests/fuzz/regressions.txt)."""
import torch

from megaclm.config.lora import LoraConfig
from megaclm.config.model import ModelConfig
from megaclm.model.gpt import GPTModel
from megaclm.model.lora import init_adapters

CONFIG = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, max_position_embeddings=16)
LORA = LoraConfig(lora_rank=4)


def _adapters(model):
    return {k: p.detach().clone() for k, p in model.named_parameters() if k.endswith(".lora_a")}


def test_adapters_do_not_depend_on_the_generator_state_at_build():
    torch.manual_seed(1)
    first = GPTModel(CONFIG, 64, lora=LORA)
    torch.manual_seed(2)
    second = GPTModel(CONFIG, 64, lora=LORA)
    before = _adapters(second)
    assert init_adapters(first, 7, 1, 0) == init_adapters(second, 7, 1, 0) == 8  # qkv, proj, fc1, fc2 x 2 layers
    a, b = _adapters(first), _adapters(second)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any(torch.equal(a[k], before[k]) for k in a)  # redrawn, not kept
    init_adapters(second, 8, 1, 0)  # another seed, other adapters
    assert not torch.equal(_adapters(second)["layers.0.attention.qkv.lora_a"], a["layers.0.attention.qkv.lora_a"])


def test_a_split_adapter_keeps_its_columns_of_the_whole_draw():
    torch.manual_seed(0)
    whole = GPTModel(CONFIG, 64, lora=LORA)
    init_adapters(whole, 7, 1, 0)
    key = "layers.1.mlp.fc2.lora_a"  # row-parallel: A (r, in) is split along its input at TP > 1
    shard = torch.nn.Parameter(torch.empty(4, whole.get_parameter(key).shape[1] // 2))
    shard.tensor_model_parallel = True
    holder = torch.nn.Module()
    holder.fc2 = torch.nn.Module()
    holder.fc2.register_parameter("lora_a", shard)
    assert init_adapters(holder, 7, 2, 1, plain_name=lambda name: key) == 1
    assert torch.equal(shard.detach(), whole.get_parameter(key).detach().chunk(2, dim=1)[1])
