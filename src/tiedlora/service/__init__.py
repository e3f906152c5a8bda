"""The fine-tuning service inside `tiedlora serve`: OpenAI's files API, kept per tenant in a SQL
store (`store`), beside the serving package it extends (`files`, `build`). Serving alone never
imports it; it imports serving and the training harness."""

from .app import build

__all__ = ["build"]
