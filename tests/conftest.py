"""Shared fixtures: tiny random-init models built from the project's own conf/model files."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
# the data dir: RSQ_DATA_DIR where set (the README's test command sets it), else ../shared/data
SHARED_DATA = Path(os.environ.get("RSQ_DATA_DIR") or ROOT.parent / "shared" / "data").expanduser()

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RSQ_DATA_DIR", str(SHARED_DATA))

# A Mistral config exists only for tests: it exercises the third adapter on a third size pair
# (hidden 448 = 28*16, intermediate 192 = 12*16, 7 heads of 64, MQA; formerly hidden 896 and head_dim 128).
TINY_MISTRAL = {
    "name": "tiny_mistral", "source": "random_init", "seed": 1, "dtype": "float32",
    "config": {
        "model_type": "mistral", "vocab_size": 257, "hidden_size": 448, "intermediate_size": 192,
        "num_hidden_layers": 2, "num_attention_heads": 7, "num_key_value_heads": 1, "head_dim": 64,
        "max_position_embeddings": 512, "tie_word_embeddings": False, "sliding_window": None,
        "bos_token_id": 256, "eos_token_id": 256, "pad_token_id": 256,
    },
}

# No Hadamard construction for intermediate 330 and head_dim 30 (not multiples of 4): R2, R3 and R4
# fall back to a seeded random orthogonal matrix (hidden 180 = 2*(89+1) has one, Paley II).
TINY_NO_HADAMARD = {
    "name": "tiny_no_hadamard", "source": "random_init", "seed": 2, "dtype": "float32",
    "config": {
        "model_type": "llama", "vocab_size": 257, "hidden_size": 180, "intermediate_size": 330,
        "num_hidden_layers": 2, "num_attention_heads": 6, "num_key_value_heads": 3, "head_dim": 30,
        "max_position_embeddings": 512, "tie_word_embeddings": True,
        "bos_token_id": 256, "eos_token_id": 256, "pad_token_id": 256,
    },
}
TEST_ONLY = {"tiny_mistral": TINY_MISTRAL, "tiny_no_hadamard": TINY_NO_HADAMARD}


def model_cfg(name: str):
    """The ``conf/model/<name>.yaml`` node (or a test-only config above)."""
    if name in TEST_ONLY:
        return OmegaConf.create(TEST_ONLY[name])
    return OmegaConf.load(ROOT / "conf" / "model" / f"{name}.yaml")


@pytest.fixture
def tokens() -> torch.Tensor:
    """(2, 24) random token ids in the tiny byte vocabulary."""
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
