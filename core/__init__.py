"""dsv32.core: vendor-neutral model graph, op interface, KV cache, loader, engine. Imports only torch and the
standard library (plus safetensors/tokenizers for loading), never a vendor library."""
