"""Training: data (grain), tokenizer, optim (optax), loop, monitor (metrics, plots, wandb) and the
`jaxllm train` CLI; checkpoints (orbax) are jaxllm.checkpoint, shared with inference. See
docs/training.md."""
