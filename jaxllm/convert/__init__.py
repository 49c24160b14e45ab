"""Weight conversion: jaxllm <-> torch_ref state_dicts and safetensors files.

Hugging Face and GGUF converters join here as `jaxllm.convert.hf` / `jaxllm.convert.gguf`.
"""
from jaxllm.convert.state_dict import (ConversionError, from_state_dict, load_safetensors, save_safetensors,
                                       to_state_dict)

__all__ = ["ConversionError", "from_state_dict", "load_safetensors", "save_safetensors", "to_state_dict"]
