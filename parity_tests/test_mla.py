"""jaxllm vs torch_ref on Multi-head Latent Attention (DeepSeek and seed-004 variants), and proof
that the comparison notices a broken MLA piece in torch_ref."""
import pytest

import torch_ref.mla as ref_mla
from parity_tests.harness import compare, make_pair, tiny_config

# Width 64, 4 heads. v_head_dim differs from nope + rope (12 vs 24), as in DeepSeek (128 vs 192).
DEEPSEEK = dict(variant="deepseek", q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                v_head_dim=12)
# A short original context so the YaRN ramp falls inside the 4 frequencies of R = 8 (low 0, high 2),
# and mscale != mscale_all_dim so both the cos/sin amplitude and the softmax mscale^2 are active.
YARN = dict(yarn_factor=40.0, yarn_original_max_position=64, yarn_beta_fast=32.0, yarn_beta_slow=1.0,
            yarn_mscale=1.0, yarn_mscale_all_dim=0.707)
SEED004 = dict(variant="seed004", q_lora_rank=24, kv_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=8,
               v_head_dim=16, rope_layout="half")


def mla_config(mla: dict, position: str = "rope", **model):
    attention = {"n_head": 4, "kind": "mla", "mla": mla, **model.pop("attention", {})}
    return tiny_config(position=dict(kind=position, rope_theta=10000.0), norm=dict(kind="rmsnorm", eps=1e-6),
                       mlp=dict(kind="swiglu", d_ff=96), attention=attention, **model)


CASES = {
    "deepseek-q-lora-interleaved-window-biases": mla_config(DEEPSEEK, attention=dict(window=16, qkv_bias=True,
                                                                                     out_bias=True)),
    "deepseek-plain-q-proj-half-yarn": mla_config({**DEEPSEEK, "q_lora_rank": None, "rope_layout": "half", **YARN}),
    "deepseek-q-lora-interleaved-yarn-v-wider": mla_config({**DEEPSEEK, **YARN, "qk_nope_head_dim": 4,
                                                            "v_head_dim": 20}),
    # seed 004: learned positions and rope together, untied head with bias
    "seed004-half": mla_config(SEED004, position="learned", tie_embeddings=False, lm_head_bias=True),
    "seed004-interleaved-yarn-window": mla_config({**SEED004, "rope_layout": "interleaved", **YARN},
                                                  attention=dict(window=40)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_mla_parity(name):
    report = compare(make_pair(CASES[name], seed=sorted(CASES).index(name)))
    print(f"{name}: {report}")
    assert report.ok(), f"{name}: {report}"


def rope_always_half(x, angles, amplitude, layout, _rope=ref_mla.apply_rope):  # ignores the interleaved layout
    return _rope(x, angles, amplitude, "half")


def softmax_scale_without_mscale(mla):  # the old HF V2 bug: no mscale^2 on the scores
    return (mla.qk_nope_head_dim + mla.qk_rope_head_dim) ** -0.5


def inv_freq_without_yarn(mla, theta):  # YaRN frequency correction forgotten
    dim = mla.qk_rope_head_dim
    return 1.0 / theta ** (ref_mla.torch.arange(0, dim, 2, dtype=ref_mla.torch.float32) / dim)


def amplitude_one(mla):  # YaRN's cos/sin factor forgotten
    return 1.0


# Each mutation breaks a config of CASES, whose unbroken pair test_mla_parity checks.
MUTATIONS = {
    "rope-layout": ("deepseek-q-lora-interleaved-window-biases", "apply_rope", rope_always_half),
    "mscale-squared": ("deepseek-q-lora-interleaved-yarn-v-wider", "softmax_scale", softmax_scale_without_mscale),
    "yarn-frequencies": ("deepseek-plain-q-proj-half-yarn", "rope_inv_freq", inv_freq_without_yarn),
    "yarn-amplitude": ("seed004-interleaved-yarn-window", "rope_amplitude", amplitude_one),
}


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_breaking_torch_ref_mla_breaks_parity(name, monkeypatch):
    case, attr, replacement = MUTATIONS[name]
    monkeypatch.setattr(ref_mla, attr, replacement)
    report = compare(make_pair(CASES[case], seed=sorted(CASES).index(case)))
    assert not report.ok(), f"{name}: breaking torch_ref went unnoticed ({report})"
