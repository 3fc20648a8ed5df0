"""Checkpoints: the native format (native.py), one format detection and `load` for every format
(formats.py), and the importers: Hugging Face folders (hf.py), GGUF files (gguf.py), xAI's Grok-1
naming (grok1.py) and Grok-2 release (grok2.py)."""

from flatstack.checkpoint.formats import convert, detect_format, load, read_config, read_tensors, tokenizer_files
from flatstack.checkpoint.native import FORMAT_KEY, CheckpointError, build_model, read_json, read_safetensors, save

__all__ = ["FORMAT_KEY", "CheckpointError", "build_model", "convert", "detect_format", "load", "read_config",
           "read_json", "read_safetensors", "read_tensors", "save", "tokenizer_files"]
