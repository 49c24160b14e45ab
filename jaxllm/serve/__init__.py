"""Serving: `engine` (continuous batching over one jitted decode step), `api` (the OpenAI request
and response shapes, the chat template), `app` (the Starlette routes), `cli` (`jaxllm serve`).
docs/serving.md is the user's guide."""
