"""ds4's HTTP service: the OpenAI-compatible API over the engine, for CI bots and OpenAI clients."""
