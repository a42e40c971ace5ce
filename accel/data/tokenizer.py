"""Tokenizers: a Hugging Face `tokenizer.json` (the `tokenizers` package; Qwen2), a SentencePiece
`tokenizer.model` (ChatGLM2/3, Baichuan2) and Qwen v1's `qwen.tiktoken` BPE ranks (the `tiktoken` package).

`load_tokenizer(DIR)` finds a checkpoint directory's own tokenizer; `load(PATH)` (used by `accel mindrecord`)
also takes the file itself. What every tokenizer does:

- `encode(text)`: the text's ids and nothing else (no BOS, no prefix), with special-token text such as
  `<|im_end|>` encoded as ordinary text, so that user content can never forge a control token;
  `encode(text, special=True)` turns special-token text into its id (rendered chat templates need it).
  Qwen v1's text is NFC-normalised first, as its tokenizer does.
- `prefix`: the ids the family's tokenizer puts before a plain prompt (`tokenizer(text)` in transformers):
  `[gMASK] sop` for ChatGLM, `<s>` for Baichuan only when its tokenizer_config.json sets add_bos_token,
  nothing for Qwen.
- `decode(ids)` (ids past the tokenizer's vocabulary, which a model's padded embedding can still
  produce, decode to nothing, as `tokenizers` does); `special_id(text)` (None for a text that is no
  special token); `vocab_size`, `eos_id`, `pad_id`.
- `encode_batch(texts)`: `accel mindrecord`'s encoding, unchanged (a tokenizer.json recognises its added
  tokens there).

The end-of-sequence and padding tokens: from `tokenizer_config.json` beside a `tokenizer.json` when it
names them (`eos_token`, `pad_token`), else the first of the usual end tokens the vocabulary has
(`<|endoftext|>` for Qwen, `</s>` for Baichuan/ChatGLM, ...); SentencePiece models carry their own ids.
Padding falls back to the end-of-sequence token (Qwen's convention), then to 0: padded positions are
masked out of the labels and the attention mask either way.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import unicodedata
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from accel.errors import UsageError
from accel.inputs import read_json_object

END_TOKENS = ("<|endoftext|>", "</s>", "<|im_end|>", "<eos>", "<|end_of_text|>", "[EOS]", "<|end|>")
PAD_TOKENS = ("<pad>", "<|pad|>", "[PAD]")
# The files a checkpoint directory's tokenizer may come as, in the order looked for.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "qwen.tiktoken")

# ChatGLM2/3's SPTokenizer appends these after the SentencePiece pieces, in this order (ChatGLM2 has the
# first five, ChatGLM3 all nine; the shared ones keep their ids).
CHATGLM_SPECIALS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>", "<|assistant|>",
                    "<|observation|>")
# Qwen v1 (tokenization_qwen.py): the split pattern and the special tokens, ids following the ranks.
QWEN_PAT_STR = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", *(f"<|extra_{i}|>" for i in range(205)))


def read_json(path: Path) -> dict[str, Any]:
    """A checkpoint's JSON object at `path` (config, tokenizer or generation config), {} when the file is
    absent; a one-line UsageError when it is not a JSON object."""
    if not path.is_file():
        return {}
    return read_json_object(path, UsageError)


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # transformers writes AddedToken as {"content": ..., ...}
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer(ABC):
    path: Path
    family: str | None  # config.json's model_type beside the tokenizer, when known
    config: dict[str, Any]  # tokenizer_config.json beside the tokenizer ({} without one)
    eos_id: int | None
    pad_id: int
    vocab_size: int
    specials: dict[str, int]  # special-token text -> id
    prefix: list[int]

    def _setup(self, path: Path, family: str | None) -> None:
        self.path = path
        self.family = family
        self.config = read_json(path.parent / "tokenizer_config.json")
        self.prefix = []

    @abstractmethod
    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        ...

    @abstractmethod
    def _encode_plain(self, text: str) -> list[int]:
        ...

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        ...

    def encode(self, text: str, special: bool = False) -> list[int]:
        if not special or not self.specials:
            return self._encode_plain(text)
        ids: list[int] = []
        for piece in self._split_specials(text):
            if piece in self.specials:
                ids.append(self.specials[piece])
            elif piece:
                ids.extend(self._encode_plain(piece))
        return ids

    def _split_specials(self, text: str) -> list[str]:
        # longest first, so that a special token that begins another never cuts it
        alternatives = "|".join(map(re.escape, sorted(self.specials, key=len, reverse=True)))
        return re.split(f"({alternatives})", text)

    def special_id(self, text: str) -> int | None:
        return self.specials.get(text)

    def require_special(self, text: str) -> int:
        token_id = self.special_id(text)
        if token_id is None:
            raise UsageError(f"{self.path} has no special token {text!r} that the {self.family} chat format needs")
        return token_id


class HFTokenizer(Tokenizer):
    def __init__(self, path: Path, family: str | None = None):
        try:
            from tokenizers import Tokenizer as RustTokenizer
        except ImportError:
            raise UsageError("reading tokenizer.json needs the tokenizers package: pip install tokenizers") from None
        try:
            self.tok = RustTokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises its own Exception type for a bad file
            raise UsageError(f"{path} is not a valid tokenizer.json ({str(e).splitlines()[0]}); "
                             "restore it from the checkpoint's release") from None
        self._setup(path, family)
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.specials = {t.content: int(i) for i, t in self.tok.get_added_tokens_decoder().items()}
        self.eos_id = self._find(_token_text(self.config.get("eos_token")), END_TOKENS)
        pad = self._find(_token_text(self.config.get("pad_token")), PAD_TOKENS)
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)

    def _find(self, named: str | None, usual: Sequence[str]) -> int | None:
        for text in ([named] if named else []) + list(usual):
            token_id = self.tok.token_to_id(text)
            if token_id is not None:
                return int(token_id)
        return None

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # encode_batch releases the GIL: the converter's background tokenising overlaps with the writer.
        # (tokenizers 0.23's encode_batch_fast, which skips the offsets, measured 1.6x slower.)
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def encode(self, text: str, special: bool = False) -> list[int]:
        # the Rust tokenizer matches added tokens itself (as transformers does) unless told not to
        self.tok.encode_special_tokens = not special
        try:
            return self.tok.encode(text, add_special_tokens=False).ids
        finally:
            self.tok.encode_special_tokens = False

    def _encode_plain(self, text: str) -> list[int]:
        return self.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, path: Path, family: str | None = None):
        try:
            import sentencepiece as spm
        except ImportError:
            raise UsageError("reading a .model tokenizer needs sentencepiece: pip install sentencepiece") from None
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise UsageError(f"{path} is not a valid SentencePiece model ({str(e).splitlines()[0]}); "
                             "restore it from the checkpoint's release") from None
        self._setup(path, family)
        n = self.sp.GetPieceSize()
        # pieces text cannot produce (<unk>, <s>, </s>) and user-defined ones, by their text
        self.specials = {self.sp.IdToPiece(i): i for i in range(n)
                         if self.sp.IsControl(i) or self.sp.IsUnknown(i) or self._user_defined(i)}
        self.appended: dict[int, str] = {}
        if family == "chatglm":
            self.appended = {n + i: t for i, t in enumerate(CHATGLM_SPECIALS)}
            self.specials |= {t: i for i, t in self.appended.items()}
            self.prefix = [self.specials["[gMASK]"], self.specials["sop"]]
        elif self.config.get("add_bos_token") and self.sp.bos_id() >= 0:
            self.prefix = [self.sp.bos_id()]
        self.vocab_size = n + len(self.appended)
        eos, pad = self.sp.eos_id(), self.sp.pad_id()  # -1 when the model defines none
        self.eos_id = eos if eos >= 0 else None
        self.pad_id = pad if pad >= 0 else (self.eos_id if self.eos_id is not None else 0)

    def _user_defined(self, i: int) -> bool:
        return bool(getattr(self.sp, "IsUserDefined", lambda _: False)(i))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.sp.Encode(list(texts))

    def _encode_plain(self, text: str) -> list[int]:
        return self.sp.Encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        # ChatGLM's appended tokens are no SentencePiece pieces: their text goes in between (as SPTokenizer does)
        text, run = "", list[int]()
        for i in ids:
            if not 0 <= int(i) < self.vocab_size:
                continue
            if int(i) in self.appended:
                text += self.sp.Decode(run) + self.appended[int(i)]
                run = []
            else:
                run.append(int(i))
        return text + self.sp.Decode(run)


class TiktokenTokenizer(Tokenizer):
    """Qwen v1's qwen.tiktoken: lines of `base64(token) rank`; the special tokens follow the ranks."""

    def __init__(self, path: Path, family: str | None = None):
        try:
            import tiktoken
        except ImportError:
            raise UsageError("reading qwen.tiktoken needs the tiktoken package: pip install tiktoken") from None
        ranks = self._read_ranks(path)
        self._setup(path, family)
        self.specials = {t: len(ranks) + i for i, t in enumerate(QWEN_SPECIALS)}
        self.enc = tiktoken.Encoding(path.name, pat_str=QWEN_PAT_STR, mergeable_ranks=ranks,
                                     special_tokens=self.specials)
        self.vocab_size = len(ranks) + len(self.specials)
        self.eos_id = self.specials["<|endoftext|>"]
        self.pad_id = self.eos_id

    @staticmethod
    def _read_ranks(path: Path) -> dict[bytes, int]:
        try:
            lines = path.read_bytes().splitlines()
        except OSError as e:
            raise UsageError(f"cannot read {path}: {e.strerror or e}") from None
        ranks: dict[bytes, int] = {}
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            parts = line.split()
            try:
                if len(parts) != 2:
                    raise ValueError
                token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
            except (ValueError, binascii.Error):
                raise UsageError(f"{path} line {n} is not `base64-token rank`; restore the file from the "
                                 "checkpoint's release") from None
            if token in ranks or rank < 0:
                raise UsageError(f"{path} line {n}: {'repeated token' if token in ranks else 'negative rank'}; "
                                 "restore the file from the checkpoint's release")
            ranks[token] = rank
        if not ranks:
            raise UsageError(f"{path} holds no BPE ranks; restore the file from the checkpoint's release")
        if len(set(ranks.values())) != len(ranks) or max(ranks.values()) != len(ranks) - 1:
            raise UsageError(f"{path}: the ranks are not 0..{len(ranks) - 1}, each once; restore the file")
        missing = [b for b in range(256) if bytes([b]) not in ranks]
        if missing:  # byte-level BPE cannot encode a byte without a rank
            raise UsageError(f"{path} lacks the single byte {missing[0]:#04x} (and {len(missing) - 1} more); "
                             "restore the file from the checkpoint's release")
        return ranks

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self._encode_plain(t) for t in texts]

    def _encode_plain(self, text: str) -> list[int]:
        return self.enc.encode(unicodedata.normalize("NFC", text), allowed_special=set(), disallowed_special=())

    def encode(self, text: str, special: bool = False) -> list[int]:
        if not special:
            return self._encode_plain(text)
        return self.enc.encode(unicodedata.normalize("NFC", text), allowed_special="all", disallowed_special=())

    def decode(self, ids: Sequence[int]) -> str:
        return self.enc.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size], errors="replace")


def _family(directory: Path) -> str | None:
    model_type = read_json(directory / "config.json").get("model_type")
    return model_type if isinstance(model_type, str) else None


def _open(path: Path, family: str | None) -> Tokenizer:
    if path.name.endswith(".json"):
        return HFTokenizer(path, family)
    if path.suffix == ".model":
        return SentencePieceTokenizer(path, family)
    if path.suffix == ".tiktoken":
        return TiktokenTokenizer(path, family)
    raise UsageError(f"{path}: unknown tokenizer format; give an HF tokenizer.json, a SentencePiece .model "
                     "or a qwen.tiktoken")


def end_tokens(tok: Tokenizer) -> set[int]:
    """The ids that end a generation: the tokenizer's end token and generation_config.json's
    eos_token_id (an id or a list: Qwen2-Instruct's <|im_end|> and <|endoftext|>, ChatGLM3's role
    tokens that open the next turn)."""
    ids = {tok.eos_id} if tok.eos_id is not None else set()
    path = tok.path.parent / "generation_config.json"
    if path.is_file():
        value = read_json(path).get("eos_token_id")
        for i in value if isinstance(value, list) else [value]:
            if isinstance(i, int) and not isinstance(i, bool) and 0 <= i < tok.vocab_size:
                ids.add(i)
    return ids


def has_tokenizer(directory: str | Path) -> bool:
    """Whether a checkpoint directory ships tokenizer files (readable or not: load_tokenizer says)."""
    return any((Path(directory) / f).is_file() for f in TOKENIZER_FILES)


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """The tokenizer a checkpoint directory ships (the first of TOKENIZER_FILES it holds), set up for the
    family its config.json names."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UsageError(f"{directory} is not a checkpoint directory; a tokenizer is read from one")
    found = next((directory / f for f in TOKENIZER_FILES if (directory / f).is_file()), None)
    if found is None:
        raise UsageError(f"{directory} holds no tokenizer ({', '.join(TOKENIZER_FILES)}); copy the checkpoint's "
                         "tokenizer files into it, or give --input-ids")
    return _open(found, _family(directory))


def load(path: str | Path) -> Tokenizer:
    """A tokenizer file (tokenizer.json, a SentencePiece .model, qwen.tiktoken) or a directory holding one."""
    path = Path(path)
    if path.is_dir():
        return load_tokenizer(path)
    if not path.is_file():
        raise UsageError(f"tokenizer file {path} does not exist")
    return _open(path, _family(path.parent))


# --- chat messages -------------------------------------------------------------------------------------

QWEN_DEFAULT_SYSTEM = "You are a helpful assistant."  # Qwen v1's make_context default, and Qwen2's template's
CHAT_ROLES = ("system", "user", "assistant", "observation")


def chat_template(tok: Tokenizer) -> str | None:
    """The checkpoint's own chat template: chat_template.jinja beside the tokenizer (what transformers 4.43+
    saves), else tokenizer_config.json's chat_template (a string, or a list of named ones: "default")."""
    jinja_file = tok.path.parent / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = tok.config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def check_messages(messages: Sequence[Any]) -> list[dict[str, str]]:
    if not messages:
        raise UsageError("a chat needs at least one message")
    out = []
    for i, m in enumerate(messages, 1):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise UsageError(f"message {i} is not {{\"role\": ..., \"content\": ...}} with string values")
        if m["role"] not in CHAT_ROLES:
            raise UsageError(f"message {i} has role {m['role']!r}; roles are {', '.join(CHAT_ROLES)}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def render_template(template: str, messages: list[dict[str, str]], variables: dict[str, Any],
                    add_generation_prompt: bool = True) -> str:
    """A chat template rendered as transformers' apply_chat_template renders it: a sandboxed Jinja
    environment with trim_blocks and lstrip_blocks, raise_exception(), a tojson that keeps non-ASCII."""
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise UsageError("rendering a chat template needs jinja2: pip install jinja2") from None

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                **variables)
    except jinja2.exceptions.TemplateError as e:
        raise UsageError(f"the chat template fails: {str(e).splitlines()[0] if str(e) else type(e).__name__}") \
            from None


def render_chat(source: str | Path | Tokenizer, messages: Sequence[Any], add_generation_prompt: bool = True) \
        -> list[int]:
    """The ids of a chat (messages of {"role", "content"}), ending with the assistant's turn opened.

    With a chat template (chat_template.jinja or tokenizer_config.json), it is rendered as transformers
    renders it and the text encoded with special tokens recognised, as apply_chat_template(tokenize=True)
    does. Without one, the family's documented format (config.json's model_type): ChatGLM3's
    build_chat_input, Qwen v1's ChatML make_context, Baichuan2's build_chat_input."""
    tok = source if isinstance(source, Tokenizer) else load_tokenizer(source)
    chat = check_messages(messages)
    template = chat_template(tok)
    if template is not None:
        names = ("bos_token", "eos_token", "unk_token", "pad_token")
        variables = {n: _token_text(tok.config.get(n)) for n in names if _token_text(tok.config.get(n))}
        return tok.encode(render_template(template, chat, variables, add_generation_prompt), special=True)
    if tok.family == "chatglm":
        return _chatglm3(tok, chat, add_generation_prompt)
    if tok.family in ("qwen", "qwen2"):
        return _chatml(tok, chat, add_generation_prompt)
    if tok.family == "baichuan":
        return _baichuan2(tok, chat, add_generation_prompt)
    raise UsageError(f"{tok.path.parent} has no chat template and its model_type {tok.family!r} no known chat "
                     "format; give a plain --prompt or --input-ids")


def _chatglm3(tok: Tokenizer, chat: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
    # [gMASK] sop, then per message <|role|> "\n" content, each part encoded apart; then <|assistant|>
    ids = list(tok.prefix)
    newline = tok.encode("\n")
    for m in chat:
        ids += [tok.require_special(f"<|{m['role']}|>"), *newline, *tok.encode(m["content"])]
    if add_generation_prompt:
        ids.append(tok.require_special("<|assistant|>"))
    return ids


def _chatml(tok: Tokenizer, chat: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
    # Qwen v1's make_context: <|im_start|>role\ncontent<|im_end|> joined by "\n", the role, the newline and
    # the content encoded apart; a default system message when the chat has none
    start, end = tok.require_special("<|im_start|>"), tok.require_special("<|im_end|>")
    newline = tok.encode("\n")
    if chat[0]["role"] != "system":
        chat = [{"role": "system", "content": QWEN_DEFAULT_SYSTEM}, *chat]
    ids: list[int] = []
    for i, m in enumerate(chat):
        ids += [*(newline if i else []), start, *tok.encode(m["role"]), *newline, *tok.encode(m["content"]), end]
    if add_generation_prompt:
        ids += [*newline, start, *tok.encode("assistant"), *newline]
    return ids


def _baichuan2(tok: Tokenizer, chat: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
    # generation_utils.build_chat_input: the system text bare, then user_token_id / assistant_token_id
    # before each turn (ids from generation_config.json), the assistant's opened unless it spoke last
    gen = read_json(tok.path.parent / "generation_config.json")
    user, assistant = int(gen.get("user_token_id", 195)), int(gen.get("assistant_token_id", 196))
    ids: list[int] = []
    for i, m in enumerate(chat):
        if m["role"] == "system":
            if i:
                raise UsageError("Baichuan2's chat format takes a system message only first")
            ids += [*tok.prefix, *tok.encode(m["content"])] if m["content"] else []
            continue
        ids += [user if m["role"] == "user" else assistant, *tok.prefix, *tok.encode(m["content"])]
    if add_generation_prompt and chat[-1]["role"] != "assistant":
        ids.append(assistant)
    return ids
