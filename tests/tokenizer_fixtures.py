"""Tiny but real tokenizer files of each family, trained here on a small built-in corpus (Chinese,
English, code), written beside a tiny checkpoint:

- qwen2: a byte-level BPE tokenizer.json built as Qwen2's is (NFC, Qwen's split regex, byte-level,
  `<|endoftext|>` `<|im_start|>` `<|im_end|>` added after the vocabulary) plus tokenizer_config.json with
  Qwen2's released chat_template;
- qwen: a qwen.tiktoken ranks file: the 256 single bytes, then merges learnt by the small BPE pass below;
- chatglm: a SentencePiece BPE tokenizer.model (byte fallback, dummy prefix), ChatGLM's specials appended
  by the tokenizer code, as the original's;
- baichuan: a SentencePiece BPE tokenizer.model (byte fallback, no dummy prefix) whose ids 195 and 196 are
  reserved pieces, Baichuan2's user and assistant tokens, plus its generation_config.json.

Every id stays below MODEL_VOCAB, the vocab_size the tests give these checkpoints (the tiny presets'
256 cannot hold Qwen v1's 208 special tokens above the 256 bytes)."""

from __future__ import annotations

import base64
import io
import json
from collections import Counter
from pathlib import Path

MODEL_VOCAB = 640

CORPUS = [
    "你好，请介绍一下你自己。我是一个人工智能助手，很高兴为你服务。",
    "今天天气很好，我们去公园散步吧。机器学习是人工智能的一个分支。",
    "计算的历史是一层又一层的抽象：晶体管之上是逻辑门，逻辑门之上是指令集。",
    "The capital of France is Paris. The quick brown fox jumps over the lazy dog.",
    "Write a Python one-liner that reverses a string. You are a helpful assistant.",
    "Summarise this passage in three sentences, then translate your summary into Chinese.",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    if n < 2:\n        return n\n",
    "    return fibonacci(n - 1) + fibonacci(n - 2)\n\nfor i in range(10):\n    print(i, fibonacci(i))\n",
    "import numpy as np\nx = np.arange(12).reshape(3, 4)\nprint(x.sum(axis=0))  # 12 15 18 21\n",
    "user assistant system 1234567890 {\"role\": \"user\", \"content\": \"hello\"}",
] * 4

# Qwen's split regex (tokenization_qwen.py PAT_STR, and Qwen2's tokenizer.json pre-tokenizer)
QWEN_PAT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
            r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# tokenizer_config.json of Qwen/Qwen2-7B-Instruct (and the base models)
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def write_tokenizer(directory: Path, family: str) -> Path:
    """The family's tokenizer files in `directory` (created if needed); returns the directory."""
    directory.mkdir(parents=True, exist_ok=True)
    {"qwen2": _qwen2, "qwen": _qwen, "chatglm": _chatglm, "baichuan": _baichuan}[family](directory)
    return directory


def checkpoint(directory: Path, family: str, **overrides) -> Path:
    """A tiny checkpoint of the family (config.json + weights, vocab MODEL_VOCAB) with its tokenizer."""
    from tests import hf_fixtures as hf
    from tests.conftest import save_hf_qwen2

    if family == "qwen2":
        save_hf_qwen2(directory, vocab_size=MODEL_VOCAB, **overrides)
    elif family == "qwen":
        cfg = hf.qwen_config(vocab_size=MODEL_VOCAB, **overrides)
        hf.write_checkpoint(directory, cfg, hf.qwen_tensors(cfg))
    elif family == "chatglm":
        cfg = hf.chatglm_config(padded_vocab_size=MODEL_VOCAB, **overrides)
        hf.write_checkpoint(directory, cfg, hf.chatglm_tensors(cfg))
    else:
        cfg = hf.baichuan_config("7b", vocab_size=MODEL_VOCAB, **overrides)
        hf.write_checkpoint(directory, cfg, hf.baichuan_tensors(cfg))
    return write_tokenizer(directory, family)


def _qwen2(d: Path) -> None:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PAT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_special_tokens(QWEN2_SPECIALS)  # after the vocabulary, as Qwen2's 151643..151645
    tok.save(str(d / "tokenizer.json"))
    added = {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                       "single_word": False, "special": True} for t in QWEN2_SPECIALS}
    config = {"add_prefix_space": False, "added_tokens_decoder": added,
              "additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "bos_token": None,
              "chat_template": QWEN2_CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
              "eos_token": "<|im_end|>", "errors": "replace", "model_max_length": 32768,
              "pad_token": "<|endoftext|>", "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer",
              "unk_token": None}
    (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))


def learn_byte_bpe(texts: list[str], merges: int) -> dict[bytes, int]:
    """Ranks of a byte-level BPE: the 256 bytes, then the `merges` most frequent adjacent pairs, merged
    greedily within the pieces Qwen's split regex makes (what tiktoken then applies by rank)."""
    import regex

    words = Counter(m.encode() for t in texts for m in regex.findall(QWEN_PAT, t))
    split = {w: [bytes([b]) for b in w] for w in words}
    ranks = {bytes([b]): b for b in range(256)}
    for _ in range(merges):
        pairs: Counter[tuple[bytes, bytes]] = Counter()
        for w, parts in split.items():
            for a, b in zip(parts, parts[1:]):
                pairs[a, b] += words[w]
        if not pairs:
            break
        (a, b), _count = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        ranks[a + b] = len(ranks)
        for w, parts in split.items():
            i, out = 0, []
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == a and parts[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(parts[i])
                    i += 1
            split[w] = out
    return ranks


def _qwen(d: Path) -> None:
    ranks = learn_byte_bpe(CORPUS, 120)
    lines = [f"{base64.b64encode(t).decode()} {r}" for t, r in sorted(ranks.items(), key=lambda kv: kv[1])]
    (d / "qwen.tiktoken").write_text("\n".join(lines) + "\n")
    config = {"tokenizer_class": "QWenTokenizer", "model_max_length": 8192,
              "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]}}
    (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def _train_sp(**options) -> bytes:
    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=out, model_type="bpe",
                                   vocab_size=options.pop("vocab_size", 420), byte_fallback=True,
                                   character_coverage=1.0, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, split_digits=True, hard_vocab_limit=False,
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2, **options)
    return out.getvalue()


def _chatglm(d: Path) -> None:
    (d / "tokenizer.model").write_bytes(_train_sp(add_dummy_prefix=True))
    config = {"tokenizer_class": "ChatGLMTokenizer", "padding_side": "left", "remove_space": False,
              "do_lower_case": False,
              "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]}}
    (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def _baichuan(d: Path) -> None:
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(_train_sp(add_dummy_prefix=False))
    pieces = list(proto.pieces)
    reserved = []
    for name in ("<reserved_106>", "<reserved_107>"):  # Baichuan2's ids 195 and 196
        p = pb.ModelProto.SentencePiece()
        p.piece, p.score, p.type = name, 0.0, pb.ModelProto.SentencePiece.USER_DEFINED
        reserved.append(p)
    del proto.pieces[:]
    proto.pieces.extend(pieces[:195] + reserved + pieces[195:])
    (d / "tokenizer.model").write_bytes(proto.SerializeToString())
    config = {"tokenizer_class": "BaichuanTokenizer", "add_bos_token": False, "add_eos_token": False,
              "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<unk>", "unk_token": "<unk>",
              "model_max_length": 4096, "use_fast": False,
              "auto_map": {"AutoTokenizer": ["tokenization_baichuan.BaichuanTokenizer", None]}}
    (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    generation = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "user_token_id": 195,
                  "assistant_token_id": 196, "max_new_tokens": 2048}
    (d / "generation_config.json").write_text(json.dumps(generation, indent=2))
