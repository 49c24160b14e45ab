"""jaxllm models in Flax NNX. `Transformer(cfg.model, rngs=nnx.Rngs(seed))` builds one."""
from jaxllm.model.transformer import Transformer, cross_entropy, lm_loss

__all__ = ["Transformer", "cross_entropy", "lm_loss"]
