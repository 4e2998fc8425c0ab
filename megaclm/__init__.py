"""megaclm: a DeepSpeed-native, Megatron-style trainer for GPT-family language models.

Layers (imports only point downward; tests/unit/test_layers.py enforces it):
L0 config, logging, utils -> L1 parallel, ops, data, tokenizer -> L2 model -> L3 checkpoint
-> L4 training -> L5 pretrain_gpt.py, tools/*.
"""

__version__ = "0.1.0"
