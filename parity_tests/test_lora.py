"""LoRA adapters (model.lora): jaxllm vs torch_ref on the same random weights, adapters included
(logits, KL, loss and every gradient, the DESIGN.md contract), and the adapters' names and layout
matching torch_ref's (PEFT's: A [r, in], B [out, r]) through the converter."""
import numpy as np
import pytest

from parity_tests.harness import compare, make_pair, tiny_config

CASES = {
    "attention-q-v": dict(position=dict(kind="rope"), attention=dict(n_head=4, n_kv_head=2),
                          lora=dict(rank=4, alpha=8.0)),
    "every-projection": dict(position=dict(kind="rope"), mlp=dict(kind="swiglu"), tie_embeddings=False,
                             attention=dict(n_head=4, n_kv_head=2, qkv_bias=True),
                             lora=dict(rank=3, alpha=5.0, targets=["layers.*.attn.*", "layers.*.mlp.*"])),
    "mla": dict(position=dict(kind="rope"), attention=dict(kind="mla", n_head=4, mla=dict(
        variant="deepseek", kv_lora_rank=24, q_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)),
                lora=dict(rank=2, targets=["layers.*.attn.kv_b_proj", "layers.1.attn.o_proj"])),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_lora_parity(name):
    pair = make_pair(tiny_config(**CASES[name]), seed=sorted(CASES).index(name))
    adapters = [k for k, _ in pair.torch_model.named_parameters() if k.endswith(("lora_a", "lora_b"))]
    assert adapters and len(adapters) % 2 == 0
    report = compare(pair)
    assert report.ok(), f"{name}: {report}"
    for name_ in adapters:  # the adapters train: their gradients were compared above and are not zero
        assert name_ in report.grad_rel


def test_adapters_start_as_the_identity_and_their_layout_is_pefts():
    from flax import nnx

    from jaxllm.convert import to_state_dict
    from jaxllm.model import Transformer

    cfg = tiny_config(**CASES["attention-q-v"]).model
    adapted = Transformer(cfg, rngs=nnx.Rngs(0))
    base = Transformer(tiny_config(position=dict(kind="rope"), attention=dict(n_head=4, n_kv_head=2)).model,
                       rngs=nnx.Rngs(0))
    tokens = np.arange(40)[None] % cfg.vocab_size
    np.testing.assert_array_equal(np.asarray(adapted(tokens)), np.asarray(base(tokens)))  # B = 0 at first
    sd = to_state_dict(adapted)
    assert sd["layers.0.attn.q_proj.lora_a"].shape == (4, 64)  # [r, in]
    assert sd["layers.0.attn.q_proj.lora_b"].shape == (64, 4)  # [out, r]
    assert sd["layers.1.attn.v_proj.lora_b"].shape == (32, 4)
    assert not any("k_proj.lora" in k or "o_proj.lora" in k for k in sd)
    bound = 1 / np.sqrt(64)
    a = sd["layers.0.attn.q_proj.lora_a"]
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.9 * bound
