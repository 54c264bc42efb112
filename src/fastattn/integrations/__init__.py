"""Adapters that plug fastattn into other libraries; each imports its library only when
used (``fastattn.integrations.transformers`` needs transformers and torch)."""
