"""The FLOP count behind every MFU figure (DESIGN.md's definition), checked against the closed form."""
from pathlib import Path

import pytest

from jaxllm.benchmarks import flops_per_token
from jaxllm.config import load_config
from tests.test_cli import dense_param_count

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("preset", ["nanogpt-cpu", "llama-374m", "tiny-llama"])
def test_flops_per_token_is_6n_plus_12lds(preset):
    m = load_config(ROOT / "configs" / f"{preset}.yaml").model
    seq = 256
    lookup_only = (m.max_seq_len * m.d_model if m.position.kind == "learned" else 0) + \
        (0 if m.tie_embeddings else m.vocab_size * m.d_model)  # tables only indexed, never multiplied
    expected = 6 * (dense_param_count(m) - lookup_only) + 12 * m.n_layer * m.d_model * seq
    assert flops_per_token(m, seq) == expected


def test_llama_374m_flops_per_token():
    m = load_config(ROOT / "configs/llama-374m.yaml").model
    # 373,867,520 params - 32,768,000 input embedding = 341,099,520 non-embedding
    assert flops_per_token(m, 1024) == 6 * 341_099_520 + 12 * 24 * 1024 * 1024
