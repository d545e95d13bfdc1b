"""The continuous-batching engine: requests, scheduler, KV block manager, encoder cache, model
runner, output processing and the async front."""
