"""The engine: request state, the torch-free scheduler, the model runner, the
synchronous LLMEngine and the offline LLM API. Submodules are imported
where used, so the torch-free parts stay torch-free."""
