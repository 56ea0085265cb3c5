"""Which vLLM versions the plugin runs on (``version_gate``), and the differences between
them, in one place (``vllm_api``)."""
