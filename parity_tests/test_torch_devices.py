"""torch_ref on an accelerator and in bfloat16, checked on the CPU. The first GPU session found
both broken: the RoPE frequencies were made on the CPU whatever the model's device (cached decode
failed on CUDA: "Expected all tensors to be on the same device"), and RoPE returned float32 for a
bfloat16 input, so a bfloat16 cached decode mixed float32 queries with bfloat16 cached values.

PyTorch's "meta" device catches the first here: an op mixing a meta tensor with a CPU tensor raises
exactly as it would with a CUDA one. MoE is left out of that check because its token dispatch
(`nonzero`) has no meta implementation."""
import numpy as np
import pytest
import torch

from jaxllm.config import to_dict
from parity_tests.harness import make_pair, tiny_config
from parity_tests.test_decode import CASES
from torch_ref.model import Cache, Transformer

NOT_ON_META = {"moe-shared-experts"}


@pytest.mark.parametrize("name", sorted(set(CASES) - NOT_ON_META))
def test_the_forward_keeps_every_tensor_on_the_models_device(name):
    model = Transformer(to_dict(tiny_config(**CASES[name]).model)).to("meta")
    tokens = torch.zeros(2, 16, dtype=torch.long, device="meta")
    logits = model(tokens)  # raises "Tensor on device cpu is not on the expected device meta!" on a mix
    assert logits.device.type == "meta"
    assert logits.shape[:2] == (2, 16)


@pytest.mark.parametrize("name", ["gqa-rope-swiglu", "mla-deepseek"])
def test_a_bfloat16_model_decodes_with_a_bfloat16_cache_close_to_float32(name):
    """Prefill + 8 one-token steps through the cache, in bfloat16 and in float32 on the same weights:
    the bfloat16 logits stay bfloat16 and within bfloat16 rounding of float32's."""
    pair = make_pair(tiny_config(**CASES[name]), seed=3, seq=40)
    tokens = torch.from_numpy(np.asarray(pair.tokens[:, :40]))
    logits = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = Transformer(to_dict(pair.cfg.model))
        model.load_state_dict(pair.torch_model.state_dict())
        model = model.to(dtype).eval()
        cache = Cache(model, 2, 48, dtype)
        steps = [model(tokens[:, :32], torch.arange(32).expand(2, 32), cache=cache)[:, -1]]
        for t in range(32, 40):
            steps.append(model(tokens[:, t:t + 1], torch.full((2, 1), t), cache=cache)[:, -1])
        logits[dtype] = torch.stack(steps, 1)
    assert logits[torch.bfloat16].dtype == torch.bfloat16
    scale = logits[torch.float32].abs().max().item()
    error = (logits[torch.bfloat16].float() - logits[torch.float32]).abs().max().item()
    assert error < 0.05 * scale, f"bfloat16 logits {error:.3g} from float32's (scale {scale:.3g})"
