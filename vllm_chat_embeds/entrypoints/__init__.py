"""What the plugin adds to vLLM's entry points (mirrors ``vllm/entrypoints/``): request-schema
stand-ins for parts (``message_schema``), beam search over embeds prompts (``beam_prompts``) and
the runtime soft prompt routes (``soft_prompt_routes``)."""
