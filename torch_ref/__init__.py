"""torch_ref: the PyTorch reference of jaxllm's models (imports nothing from jaxllm)."""
