"""jaxllm models in Flax NNX. `Transformer(cfg.model, rngs=nnx.Rngs(seed))` builds one; `lm_loss` is
the training loss (`jaxllm.model.losses`)."""
from jaxllm.model.losses import cross_entropy, lm_loss, next_token_loss, tidar_losses
from jaxllm.model.transformer import Transformer

__all__ = ["Transformer", "cross_entropy", "lm_loss", "next_token_loss", "tidar_losses"]
