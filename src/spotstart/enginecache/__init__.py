"""The engine's compile caches (vLLM, torch inductor, Triton, FlashInfer) keyed, packed, published
to a bucket and restored on the next start, so a warm start skips the compile."""
