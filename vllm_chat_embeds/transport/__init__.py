"""How rows cross process boundaries (the API server, the engine core, each worker)."""
