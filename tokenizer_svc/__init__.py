"""Tokenizer service: tokenization, chat templates and incremental detokenization.

Stateless over Hugging Face `tokenizers`; imports no torch.
"""

from tessera.tokenizer_svc.chat_template import ChatTemplateError
from tessera.tokenizer_svc.detokenizer import IncrementalDetokenizer
from tessera.tokenizer_svc.tokenizer import Tokenizer

__all__ = ["ChatTemplateError", "IncrementalDetokenizer", "Tokenizer"]
