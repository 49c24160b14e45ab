"""Weight conversion: jaxllm <-> torch_ref state_dicts and safetensors files.

Hugging Face directories: `jaxllm.convert.hf` (save_hf / load_hf); GGUF files: `jaxllm.convert.gguf`
(save_gguf / load_gguf); the `jaxllm convert` command: `jaxllm.convert.cli`. See docs/interop.md.
"""
from jaxllm.convert.state_dict import (from_state_dict, load_safetensors, merge_lora, model_from_state_dict,
                                      save_safetensors, to_state_dict)

__all__ = ["from_state_dict", "load_safetensors", "merge_lora", "model_from_state_dict", "save_safetensors",
           "to_state_dict"]
