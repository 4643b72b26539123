"""Hugging Face interop: ``load_hf`` (import, sharded and streaming) and ``save_hf`` (export)."""

from jaxcpt.hf.convert import load_hf, read_hf_config, save_hf

__all__ = ["load_hf", "save_hf", "read_hf_config"]
