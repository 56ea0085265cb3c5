"""Which vLLM versions the plugin runs on, and the differences between them, in one place."""
