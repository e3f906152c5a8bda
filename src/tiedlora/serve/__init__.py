"""Serving many adapters over one base model: the multi-adapter model (multi.py), the engine
that batches requests across adapters (engine.py), the HTTP layer speaking OpenAI's API
(schemas.py, app.py) and the assembly that `tiedlora serve` runs (server.py). Serving reads
adapters and run folders but imports nothing from the training harness."""
