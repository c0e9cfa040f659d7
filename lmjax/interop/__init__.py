"""Moving lmjax models to and from other ecosystems (hf.py: Hugging Face safetensors)."""
