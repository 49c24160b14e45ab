"""Training: data (grain), tokenizer, optim (optax), checkpoint (orbax), loop, monitor (metrics,
plots, wandb) and the `jaxllm train` CLI. See docs/training.md."""
