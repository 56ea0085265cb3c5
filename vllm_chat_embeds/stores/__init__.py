"""Embedding rows the server keeps by name, shared by every entry point and renderer mode:
PEFT prompt-tuning soft prompts (``soft_prompts``, named by the operator) and parts sent once and
referred to by a client-chosen uuid afterwards (``references``)."""
