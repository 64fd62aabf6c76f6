from megatron.core.transformer.config import TransformerConfig
from megatron.core.transformer.layer import MLP, SelfAttention, TransformerBlock, TransformerLayer

__all__ = ["TransformerConfig", "TransformerBlock", "TransformerLayer", "SelfAttention", "MLP"]
