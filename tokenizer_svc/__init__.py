"""Tokenizer service: tokenization, chat templates and incremental detokenization.

Stateless over Hugging Face `tokenizers`; imports no torch.
"""

from tokenizer_svc.chat_template import ChatTemplateError
from tokenizer_svc.detokenizer import IncrementalDetokenizer
from tokenizer_svc.tokenizer import Tokenizer

__all__ = ["ChatTemplateError", "IncrementalDetokenizer", "Tokenizer"]
