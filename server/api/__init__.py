"""The HTTP layer: OpenAI-compatible routes over the async engine. Never imports torch."""
