"""Parts across vLLM's KV-transfer layer (extends ``vllm/distributed/kv_transfer/``): content
keys for rows (``row_keys``) and which KV connectors serve parts (``connectors``)."""
