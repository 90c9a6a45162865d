"""Tiny randomly initialised transformers models for tests (never downloaded)."""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_llama(seed: int = 0, *, hidden: int = 32, layers: int = 2, vocab: int = 64, intermediate: int = 48,
               heads: int = 4, kv_heads: int = 2, tie: bool = False, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=64, tie_word_embeddings=tie)
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    return model


def tiny_gpt2(seed: int = 0, *, n_embd: int = 32, n_layer: int = 2, vocab: int = 64, n_head: int = 4,
              dtype=torch.float32):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_positions=64)
    return GPT2LMHeadModel(cfg).to(dtype).eval()


def save(model, path: Path, **kwargs) -> Path:
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    return Path(path)


def input_ids(vocab: int = 64, batch: int = 2, length: int = 8, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g)


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()
