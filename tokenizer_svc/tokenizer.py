"""The `Tokenizer`: text <-> token ids and chat templates for one model, over HF `tokenizers`.

Owns loading a model's tokenizer from wherever its weights live (a GGUF file's
metadata or a Hugging Face directory's tokenizer.json and tokenizer_config.json) and
the model's notion of special tokens (BOS, EOS, end of turn). Imports no torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tokenizers

from tessera.common.registry import ModelSource
from tessera.tokenizer_svc.chat_template import ChatTemplateError, render_chat_template
from tessera.tokenizer_svc.gguf_vocab import build_tokenizer, read_tokenizer_metadata

_SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
_GGUF_SPECIAL_IDS = {
    "bos_token": "bos_token_id",
    "eos_token": "eos_token_id",
    "unk_token": "unknown_token_id",
    "pad_token": "padding_token_id",
}


@dataclass(slots=True, frozen=True, eq=False)
class Tokenizer:
    """One model's tokenizer. Build it with `load`, `from_gguf` or `from_hf_dir`."""

    backend: tokenizers.Tokenizer
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]  # any of these ends a generation (EOS, end of turn)
    chat_template: str | None
    # Template variables: bos_token, eos_token, unk_token, pad_token as text.
    special_tokens: dict[str, str] = field(default_factory=dict)
    name: str = ""

    @staticmethod
    def load(source: ModelSource) -> Tokenizer | None:
        """The tokenizer of `source`; None for random weights, which have none."""
        if source.kind == "random":
            return None
        if source.path is None:
            raise ValueError(f"model source {source.name!r} has no path to a tokenizer")
        if source.kind == "gguf":
            return Tokenizer.from_gguf(source.path, name=source.name)
        return Tokenizer.from_hf_dir(source.path, name=source.name)

    @staticmethod
    def from_gguf(path: str | Path, name: str = "") -> Tokenizer:
        """Rebuild the tokenizer described by a GGUF file's `tokenizer.*` metadata."""
        meta = read_tokenizer_metadata(str(path))
        if "tokenizer.ggml.tokens" not in meta:
            raise ValueError(f"GGUF file {path} carries no tokenizer (tokenizer.ggml.tokens)")
        is_sentencepiece = meta.get("tokenizer.ggml.model") == "llama"
        # llama.cpp adds BOS to SentencePiece vocabularies unless the file says otherwise.
        add_bos = meta.get("tokenizer.ggml.add_bos_token", is_sentencepiece)
        add_eos = meta.get("tokenizer.ggml.add_eos_token", False)
        tokens = meta["tokenizer.ggml.tokens"]
        special_ids = {
            role: meta[f"tokenizer.ggml.{key}"]
            for role, key in _GGUF_SPECIAL_IDS.items()
            if f"tokenizer.ggml.{key}" in meta
        }
        eos_ids = [meta.get(f"tokenizer.ggml.{key}") for key in ("eos_token_id", "eot_token_id")]
        return Tokenizer(
            backend=build_tokenizer(meta, add_bos=add_bos, add_eos=add_eos),
            bos_token_id=special_ids.get("bos_token"),
            eos_token_ids=tuple(dict.fromkeys(i for i in eos_ids if i is not None)),
            chat_template=meta.get("tokenizer.chat_template"),
            special_tokens={role: tokens[i] for role, i in special_ids.items()},
            name=name or Path(path).stem,
        )

    @staticmethod
    def from_hf_dir(path: str | Path, name: str = "") -> Tokenizer:
        """Load tokenizer.json, with special tokens and the chat template from
        tokenizer_config.json (or chat_template.jinja) and EOS ids from generation_config.json."""
        directory = Path(path)
        if not (directory / "tokenizer.json").is_file():
            raise ValueError(
                f"{directory} has no tokenizer.json; Tessera needs a fast (tokenizers) "
                "tokenizer. Save one with transformers: AutoTokenizer.from_pretrained(...)"
                ".save_pretrained(dir)"
            )
        backend = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
        config = _read_json(directory / "tokenizer_config.json")
        special = {
            key: _token_text(config[key])
            for key in _SPECIAL_TOKEN_NAMES
            if config.get(key) is not None
        }
        eos_ids = [backend.token_to_id(special["eos_token"])] if "eos_token" in special else []
        for file in ("generation_config.json", "config.json"):
            eos_ids.extend(_as_list(_read_json(directory / file).get("eos_token_id")))
        bos = special.get("bos_token")
        return Tokenizer(
            backend=backend,
            bos_token_id=backend.token_to_id(bos) if bos is not None else None,
            eos_token_ids=tuple(dict.fromkeys(i for i in eos_ids if i is not None)),
            chat_template=_hf_chat_template(directory, config),
            special_tokens=special,
            name=name or directory.name,
        )

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. Special-token text in `text` (e.g. "<|im_start|>") becomes
        its id. `add_special_tokens` adds BOS (EOS) only where the model asks for it; pass
        False for a rendered chat template, which writes its own."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        """`encode` over many texts, in parallel in the Rust backend."""
        encodings = self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)
        return [encoding.ids for encoding in encodings]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary spelling of `token_id` (byte-level or "▁" form), None if unknown."""
        return self.backend.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        chat_template: str | None = None,
        **template_kwargs: Any,
    ) -> str:
        """Render the conversation as the model's prompt text (sandboxed Jinja).

        `chat_template` overrides the model's own; `template_kwargs` are passed to the
        template (e.g. `enable_thinking=False`). Raises ChatTemplateError.
        """
        template = chat_template or self.chat_template
        if template is None:
            raise ChatTemplateError(
                f"model {self.name!r} has no chat template; send a plain prompt (the "
                "completions API) or pass a chat_template"
            )
        variables = {**self.special_tokens, **template_kwargs}
        return render_chat_template(
            template,
            messages,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            **variables,
        )


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc


def _token_text(token: str | dict[str, Any]) -> str:
    # tokenizer_config.json writes special tokens as text or as an AddedToken dict.
    return token["content"] if isinstance(token, dict) else token


def _as_list(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)


def _hf_chat_template(directory: Path, config: dict[str, Any]) -> str | None:
    """chat_template.jinja (transformers >= 4.50), else tokenizer_config.json's (a string,
    or a list of named templates: "default" is used), else chat_template.json's."""
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text()
    template = config.get("chat_template") or _read_json(directory / "chat_template.json").get(
        "chat_template"
    )
    if isinstance(template, list):
        named = {entry["name"]: entry["template"] for entry in template}
        return named.get("default")
    return template
