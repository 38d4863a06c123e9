"""Public diffusion LMs in their Hugging Face layout (LLaDA, Dream): read as configurations of SMDM.

No remote code runs and nothing is fetched: config.json names the family (`model_type`), the
weights come tensor by tensor from safetensors files, the tokenizer from tokenizer.json, the
special ids from the directory's own files.
"""

from tzd.hf.families import FAMILIES, Family, family_of
from tzd.hf.loader import is_hf_checkpoint, load_hf_checkpoint

__all__ = ["FAMILIES", "Family", "family_of", "is_hf_checkpoint", "load_hf_checkpoint"]
