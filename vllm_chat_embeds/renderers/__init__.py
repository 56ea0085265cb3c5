"""Chat rendering with prompt_embeds parts, one module per vLLM renderer concern (mirrors
``vllm/renderers/``): ``parts`` takes parts out of messages, ``base`` holds the steps every
served mode shares, ``hf``/``mistral``/``generic`` are the renderer classes, ``splice`` and
``marker_ids`` turn markers into placeholder spans, ``registry`` refuses unserved modes."""
