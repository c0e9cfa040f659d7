"""Data layer: tokenizer.py (SentencePiece), sources.py (local text, synthetic), pipeline.py
(grain order, per-process rows, exact resume). `pipeline.build(cfg)` is the entry point."""
