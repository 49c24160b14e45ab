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


def test_flops_count_core_layers_once_per_loop_and_tidar_twice():
    base = load_config(ROOT / "configs/tiny-llama.yaml").model
    m = load_config(ROOT / "configs/tiny-llama.yaml", ["model.n_layer=3", "model.recursion.mode=trm",
                                                       "model.recursion.n_prelude=1", "model.recursion.n_core=1",
                                                       "model.recursion.n_loops=2", "model.recursion.n_latent_steps=3"]).model
    D, seq = m.d_model, 64
    layer = (dense_param_count(m) - dense_param_count(load_config(ROOT / "configs/tiny-llama.yaml",
                                                                  ["model.n_layer=2"]).model))
    calls = 2 * (3 + 1)  # 2 cycles of 3 latent updates and one answer update
    plain = flops_per_token(load_config(ROOT / "configs/tiny-llama.yaml", ["model.n_layer=3"]).model, seq)
    assert flops_per_token(m, seq) == plain + 6 * (calls - 1) * layer + 12 * (calls - 1) * D * seq
    tidar = load_config(ROOT / "configs/tiny-llama.yaml", ["model.diffusion.enabled=true"]).model
    assert flops_per_token(tidar, seq) == 2 * flops_per_token(base, 2 * seq)
