"""Tokenizer: a `tokenizers.Tokenizer` plus chat template and special ids, built from HF files or GGUF metadata."""
from __future__ import annotations

import datetime
import functools
import json
from pathlib import Path
from typing import Any, Sequence

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

from lowering.checkpoints.base import CheckpointError, read_json_object

LLMC_TOKENIZER_FILE = "llmc_tokenizer.json"
LLMC_TOKENIZER_FORMAT = 1

# GGUF `tokenizer.ggml.token_type` values (llama.cpp's llama_token_type).
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4

# GGUF architectures whose SentencePiece ("llama") vocabularies llmc builds, and SentencePiece's space.
GEMMA_SENTENCEPIECE_ARCHITECTURES = ("gemma", "gemma2", "gemma3")
SPM_SPACE = "\u2581"

# Pre-tokenizer split regexes as llama.cpp's `llama-vocab.cpp` defines them per `tokenizer.ggml.pre`;
# each is applied in turn (Split, isolated) before the bytes are mapped to the byte-level alphabet.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DIGIT_SPLIT = r"\p{N}"

GGUF_PRE_TOKENIZER_SPLITS: dict[str, tuple[str, ...]] = {
    "default": (_GPT2_SPLIT,),
    "gpt2": (_GPT2_SPLIT,),
    # NOTE: SmolLM2 was trained with every digit its own pre-token (HF `Digits(individual_digits=True)`);
    # llama.cpp reproduces that with a `\p{N}` split ahead of the GPT-2 regex, and so do we.
    "smollm": (_DIGIT_SPLIT, _GPT2_SPLIT),
    "starcoder": (_DIGIT_SPLIT, _GPT2_SPLIT),
    "llama-bpe": (_LLAMA3_SPLIT,),
    "llama3": (_LLAMA3_SPLIT,),
    "llama-v3": (_LLAMA3_SPLIT,),
    "falcon3": (_LLAMA3_SPLIT,),
    "dbrx": (_LLAMA3_SPLIT,),
    "smaug-bpe": (_LLAMA3_SPLIT,),
    "qwen2": (_QWEN2_SPLIT,),
    "deepseek-r1-qwen": (_QWEN2_SPLIT,),
    "stablelm2": (_QWEN2_SPLIT,),
}


class ChatTemplateError(ValueError):
    """A chat template failed to render, or asked to fail (its `raise_exception`)."""


@functools.lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: printable bytes keep their character, the rest move to U+0100 onward."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    num_moved = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + num_moved)
            num_moved += 1
    return mapping


class Tokenizer:
    """Text <-> token ids, the chat template, and the special ids generation needs."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        chat_template: str | None = None,
        bos_token_id: int | None = None,
        eos_token_ids: Sequence[int] = (),
        pad_token_id: int | None = None,
        unk_token_id: int | None = None,
    ):
        self.backend = backend
        self._chat_template = chat_template
        self._bos_token_id = bos_token_id
        self._eos_token_ids = tuple(dict.fromkeys(int(i) for i in eos_token_ids))
        self.pad_token_id = pad_token_id
        self.unk_token_id = unk_token_id

    # ---- encoding -------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(int(i))

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._bos_token_id

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._eos_token_ids

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    # ---- chat template --------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """Render `messages` with the model's template; extra keyword arguments become template variables."""
        if self._chat_template is None:
            raise ChatTemplateError("this tokenizer has no chat template; encode the prompt text directly")
        variables = {
            "bos_token": self._token_text(self._bos_token_id),
            "eos_token": self._token_text(self._eos_token_ids[0] if self._eos_token_ids else None),
            "pad_token": self._token_text(self.pad_token_id),
            "unk_token": self._token_text(self.unk_token_id),
            **kwargs,
        }
        try:
            return _compile_template(self._chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt, **variables
            )
        except ChatTemplateError:
            raise
        except Exception as e:  # jinja2 errors and anything the template's own code raises
            raise ChatTemplateError(f"chat template failed to render: {type(e).__name__}: {e}") from e

    def _token_text(self, i: int | None) -> str:
        return "" if i is None else (self.backend.id_to_token(i) or "")

    # ---- persistence ----------------------------------------------------------------------------

    def save(self, directory: str | Path) -> None:
        """Write `tokenizer.json` and `llmc_tokenizer.json` (template and special ids) into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        meta = {
            "format": LLMC_TOKENIZER_FORMAT,
            "chat_template": self._chat_template,
            "bos_token_id": self._bos_token_id,
            "eos_token_ids": list(self._eos_token_ids),
            "pad_token_id": self.pad_token_id,
            "unk_token_id": self.unk_token_id,
        }
        (directory / LLMC_TOKENIZER_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False))

    @classmethod
    def load(cls, directory: str | Path) -> "Tokenizer":
        """Read what `save` wrote; JSON only, nothing is executed or unpickled."""
        directory = Path(directory)
        meta = _read_json(directory / LLMC_TOKENIZER_FILE, "the llmc tokenizer metadata")
        if meta.get("format") != LLMC_TOKENIZER_FORMAT:
            raise CheckpointError(
                f"{directory / LLMC_TOKENIZER_FILE}: unknown tokenizer format {meta.get('format')!r}; "
                f"this llmc reads format {LLMC_TOKENIZER_FORMAT}, re-export the model"
            )
        return cls(
            _read_backend(directory / "tokenizer.json"),
            chat_template=meta.get("chat_template"),
            bos_token_id=meta.get("bos_token_id"),
            eos_token_ids=meta.get("eos_token_ids") or (),
            pad_token_id=meta.get("pad_token_id"),
            unk_token_id=meta.get("unk_token_id"),
        )

    @classmethod
    def from_hf_dir(cls, directory: str | Path, *, extra_eos_token_ids: Sequence[int] = ()) -> "Tokenizer":
        """A Hugging Face tokenizer directory: `tokenizer.json`, plus `tokenizer_config.json` if present.

        `extra_eos_token_ids` (e.g. from `config.json` / `generation_config.json`) join the tokenizer's eos.
        """
        directory = Path(directory)
        backend = _read_backend(directory / "tokenizer.json")
        config_path = directory / "tokenizer_config.json"
        config = _read_json(config_path, "the tokenizer config") if config_path.is_file() else {}

        def special_id(key: str) -> int | None:
            value = config.get(key)
            if isinstance(value, dict):  # a serialized AddedToken
                value = value.get("content")
            return backend.token_to_id(value) if isinstance(value, str) else None

        eos = special_id("eos_token")
        return cls(
            backend,
            chat_template=_hf_chat_template(directory, config),
            bos_token_id=special_id("bos_token"),
            eos_token_ids=([eos] if eos is not None else []) + [int(i) for i in extra_eos_token_ids],
            pad_token_id=special_id("pad_token"),
            unk_token_id=special_id("unk_token"),
        )

    @classmethod
    def from_gguf_metadata(cls, fields: dict[str, Any]) -> "Tokenizer":
        """Build the tokenizer a GGUF file describes from its (decoded) `tokenizer.ggml.*` metadata: byte-level
        BPE ("gpt2") or Gemma's SentencePiece BPE ("llama" in a gemma / gemma2 / gemma3 file)."""
        model = fields.get("tokenizer.ggml.model")
        tokens: list[str] = list(fields.get("tokenizer.ggml.tokens") or [])
        if model == "gpt2":
            backend, vocab, spelled = _byte_level_bpe(fields, tokens)
        elif model == "llama":
            backend, vocab, spelled = _gemma_sentencepiece_bpe(fields, tokens)
        else:
            raise CheckpointError(
                f"GGUF tokenizer model {model!r} is not supported; llmc builds byte-level BPE ('gpt2') and Gemma's "
                "SentencePiece ('llama') tokenizers from GGUF metadata. Load the model's Hugging Face directory "
                "instead."
            )
        token_types: list[int] = list(fields.get("tokenizer.ggml.token_type") or [])

        # Control tokens are matched whole and are special (skipped on decode); user-defined ones are
        # matched whole but kept. A control token the model spells differently (outside the byte alphabet)
        # is a mislabel in some converted files and would grow the vocabulary past the model's, so it is left
        # alone; so is a user-defined token the model spells differently (Gemma's runs of spaces).
        num_types = min(len(tokens), len(token_types))
        specials = [
            AddedToken(tokens[i], special=True, normalized=False)
            for i in range(num_types)
            if token_types[i] == TOKEN_TYPE_CONTROL and spelled(tokens[i]) == tokens[i]
        ]
        user_defined = [
            AddedToken(tokens[i], special=False, normalized=False)
            for i in range(num_types)
            if token_types[i] == TOKEN_TYPE_USER_DEFINED and tokens[i] in vocab
        ]
        if specials:
            backend.add_special_tokens(specials)
        if user_defined:
            backend.add_tokens(user_defined)

        def token_id(key: str) -> int | None:
            value = fields.get(key)
            return int(value) if value is not None and 0 <= int(value) < len(tokens) else None

        bos, eos = token_id("tokenizer.ggml.bos_token_id"), token_id("tokenizer.ggml.eos_token_id")
        # NOTE: a SentencePiece vocabulary that does not say gets a BOS, as llama.cpp and transformers do.
        add_bos = bool(fields.get("tokenizer.ggml.add_bos_token", model == "llama")) and bos is not None
        add_eos = bool(fields.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
        if add_bos or add_eos:
            begin = [(spelled(tokens[bos]), bos)] if add_bos else []
            end = [(spelled(tokens[eos]), eos)] if add_eos else []
            single = [token for token, _ in begin] + ["$A"] + [token for token, _ in end]
            backend.post_processor = processors.TemplateProcessing(single=single, special_tokens=begin + end)

        eos_ids = [eos] + [token_id(f"tokenizer.ggml.{k}_token_id") for k in ("eot", "eom")]
        return cls(
            backend,
            chat_template=fields.get("tokenizer.chat_template"),
            bos_token_id=bos,
            eos_token_ids=[i for i in eos_ids if i is not None],
            pad_token_id=token_id("tokenizer.ggml.padding_token_id"),
            unk_token_id=token_id("tokenizer.ggml.unknown_token_id"),
        )


def _byte_level_bpe(fields: dict[str, Any], tokens: list[str]):
    """(backend, vocab, spelled) of a GGUF byte-level BPE tokenizer ("gpt2"): merges from the file, the
    pre-tokenizer split `tokenizer.ggml.pre` names; spelled(token) is the token as the BPE model sees it."""
    merges: list[str] = list(fields.get("tokenizer.ggml.merges") or [])
    if not tokens or not merges:
        raise CheckpointError("GGUF metadata lacks tokenizer.ggml.tokens or tokenizer.ggml.merges")
    pre = fields.get("tokenizer.ggml.pre") or "default"
    if pre not in GGUF_PRE_TOKENIZER_SPLITS:
        raise CheckpointError(
            f"GGUF pre-tokenizer {pre!r} is not supported; known: {', '.join(sorted(GGUF_PRE_TOKENIZER_SPLITS))}"
        )
    alphabet = byte_to_unicode()
    alphabet_chars = set(alphabet.values())

    def spelled(token: str) -> str:
        # NOTE: a token that uses characters outside the byte alphabet (a raw added token) is looked
        # up by the byte-level spelling of its UTF-8, as the BPE model sees text.
        if set(token) <= alphabet_chars:
            return token
        return "".join(alphabet[b] for b in token.encode("utf-8"))

    vocab = {spelled(token): i for i, token in enumerate(tokens)}
    pairs = []
    for merge in merges:
        left, sep, right = merge.partition(" ")
        if not sep:
            raise CheckpointError(f"GGUF merge {merge!r} is not of the form 'left right'")
        pairs.append((left, right))
    backend = tokenizers.Tokenizer(
        models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False, ignore_merges=False)
    )
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(pattern), behavior="isolated") for pattern in GGUF_PRE_TOKENIZER_SPLITS[pre]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    return backend, vocab, spelled


def _gemma_sentencepiece_bpe(fields: dict[str, Any], tokens: list[str]):
    """(backend, vocab, spelled) of Gemma's SentencePiece BPE from GGUF metadata, built as transformers builds
    it from the same file: spaces become SentencePiece's U+2581, there is no pre-tokenizer and no prefix space,
    unknown characters fall back to <0xNN> byte tokens. The file has no merges; they are the vocabulary's own
    splits (every token that is two tokens joined), ranked by the joined token's position in the file (Gemma's
    scores do not follow its merge order), longer left parts first."""
    arch = fields.get("general.architecture")
    if arch not in GEMMA_SENTENCEPIECE_ARCHITECTURES:
        raise CheckpointError(
            f"GGUF tokenizer model 'llama' is not supported for architecture {arch!r}: llmc builds SentencePiece "
            f"('llama') tokenizers from GGUF metadata for {', '.join(GEMMA_SENTENCEPIECE_ARCHITECTURES)} only. "
            "Load the model's Hugging Face directory instead."
        )
    if not tokens:
        raise CheckpointError("GGUF metadata lacks tokenizer.ggml.tokens")

    def spelled(token: str) -> str:
        # NOTE: Gemma files store tokens made of runs of spaces with real spaces; the model sees U+2581s.
        return SPM_SPACE * len(token) if " " in token and token.isspace() else token

    vocab = {spelled(token): i for i, token in enumerate(tokens)}
    merges = []
    for token, _ in sorted(vocab.items(), key=lambda item: item[1]):
        for cut in range(len(token) - 1, 0, -1):
            if token[:cut] in vocab and token[cut:] in vocab:
                merges.append((token[:cut], token[cut:]))
    unk = fields.get("tokenizer.ggml.unknown_token_id")
    unk_token = tokens[int(unk)] if unk is not None and 0 <= int(unk) < len(tokens) else None
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk_token, fuse_unk=True,
                                              byte_fallback=True, ignore_merges=False))
    backend.normalizer = normalizers.Replace(" ", SPM_SPACE)
    backend.decoder = decoders.Sequence([decoders.Replace(SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    return backend, vocab, spelled


@functools.lru_cache(maxsize=16)
def _compile_template(source: str):
    """Compile a chat template in jinja2's immutable sandbox with the helpers HF templates expect."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise ChatTemplateError(f"chat template raised: {message}")

    def tojson(value, indent=None, ensure_ascii=False, separators=None, sort_keys=False):
        return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except Exception as e:
        raise ChatTemplateError(f"chat template does not compile: {type(e).__name__}: {e}") from e


def _read_json(path: Path, what: str) -> dict[str, Any]:
    return read_json_object(path, what, "the tokenizer directory is incomplete or corrupt: re-create it")


def _read_backend(path: Path) -> tokenizers.Tokenizer:
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found; a tokenizer directory needs tokenizer.json")
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise CheckpointError(f"{path}: not a valid tokenizers JSON file ({e}); re-create it") from e


def _hf_chat_template(directory: Path, config: dict[str, Any]) -> str | None:
    """The chat template from `chat_template.jinja`, `chat_template.json` or `tokenizer_config.json`."""
    jinja_path = directory / "chat_template.jinja"
    if jinja_path.is_file():
        return jinja_path.read_text(encoding="utf-8")
    json_path = directory / "chat_template.json"
    template = _read_json(json_path, "the chat template").get("chat_template") if json_path.is_file() else None
    if template is None:
        template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    return template if isinstance(template, str) else None
