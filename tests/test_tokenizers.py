"""A checkpoint's own tokenizer: accel's encoding against the reference implementations (transformers,
sentencepiece, tiktoken) on tiny tokenizers trained here, the chat formats' id layouts, one-line errors for
bad files and prompts, and `accel infer` / `accel generate` with text in and text out."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from accel.cli import main
from accel.data import prompts as P
from accel.data.tokenizer import load_tokenizer, render_chat
from accel.errors import UsageError
from tests.conftest import run_cli
from tests.tokenizer_fixtures import MODEL_VOCAB, QWEN2_CHAT_TEMPLATE, checkpoint, learn_byte_bpe, write_tokenizer

TEXTS = ["你好，请介绍一下你自己。", "The quick brown fox jumps over the lazy dog.",
         "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1)\n", "混合 mixed 文本 text 123456  \n\n end",
         "unseen 字符 ☃ é 😀"]
CHAT = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "def f(x): return x"}]


def tok_dir(tmp_path, family):
    """Tokenizer files plus a config.json naming the family (no weights)."""
    d = write_tokenizer(tmp_path / family, family)
    (d / "config.json").write_text(json.dumps({"model_type": family, "seq_length": 32,
                                               "max_position_embeddings": 32}))
    return d


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("tok")
    return {f: tok_dir(base, f) for f in ("qwen2", "qwen", "chatglm", "baichuan")}


# --- agreement with the reference implementations --------------------------------------------------


def test_qwen2_matches_transformers(dirs):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(dirs["qwen2"])
    tok = load_tokenizer(dirs["qwen2"])
    for text in TEXTS + ["a<|im_end|>b"]:
        assert tok.encode(text, special=True) == ref.encode(text, add_special_tokens=False), text
    assert tok.encode("a<|im_end|>b") != tok.encode("a<|im_end|>b", special=True)  # plain: no forged token
    want = ref.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False)
    got = render_chat(tok, CHAT)
    assert got == list(want)
    assert tok.decode(got).endswith("<|im_start|>assistant\n")
    assert tok.vocab_size == len(ref) and tok.eos_id == ref.convert_tokens_to_ids("<|im_end|>")


def test_qwen2_template_is_the_released_one(dirs):
    text = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n" \
           "<|im_start|>assistant\n"
    tok = load_tokenizer(dirs["qwen2"])
    assert render_chat(tok, CHAT[:1]) == tok.encode(text, special=True)
    assert "You are a helpful assistant." in QWEN2_CHAT_TEMPLATE


@pytest.mark.parametrize("family", ["chatglm", "baichuan"])
def test_sentencepiece_matches_the_package(dirs, family):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(dirs[family] / "tokenizer.model"))
    tok = load_tokenizer(dirs[family])
    for text in TEXTS:
        assert tok.encode(text) == sp.encode(text), text
        assert tok.decode(tok.encode(text)) == text


def test_baichuan_matches_transformers_llama_tokenizer(dirs):
    """Baichuan2's BaichuanTokenizer is LlamaTokenizer's SentencePiece path without BOS or a prefix space."""
    from transformers import LlamaTokenizer

    ref = LlamaTokenizer.from_pretrained(dirs["baichuan"], add_bos_token=False, add_eos_token=False, legacy=True,
                                         add_prefix_space=False)
    tok = load_tokenizer(dirs["baichuan"])
    for text in TEXTS[:4]:
        assert tok.encode(text) == ref.encode(text, add_special_tokens=False), text
    chat_ids = render_chat(tok, CHAT)
    assert tok.decode(chat_ids + [MODEL_VOCAB - 1]) == tok.decode(chat_ids)  # padded-vocab ids decode to nothing


def test_qwen_tiktoken_matches_tiktoken_and_hand_computed(dirs):
    import tiktoken

    from accel.data.tokenizer import QWEN_PAT_STR

    lines = (dirs["qwen"] / "qwen.tiktoken").read_text().split("\n")
    ranks = {base64.b64decode(t): int(r) for t, r in (line.split() for line in lines if line)}
    specials = {"<|endoftext|>": len(ranks), "<|im_start|>": len(ranks) + 1, "<|im_end|>": len(ranks) + 2,
                **{f"<|extra_{i}|>": len(ranks) + 3 + i for i in range(205)}}
    ref = tiktoken.Encoding("ref", pat_str=QWEN_PAT_STR, mergeable_ranks=ranks, special_tokens=specials)
    tok = load_tokenizer(dirs["qwen"])
    for text in TEXTS:
        assert tok.encode(text) == ref.encode(text, disallowed_special=()), text
        assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == len(ranks) + 208 and tok.special_id("<|extra_204|>") == len(ranks) + 207
    # by hand: an unseen byte stays itself; "\n" is one byte; specials only with special=True
    assert tok.encode("\x07") == [7] and tok.encode("\n") == [10]
    assert tok.encode("<|im_end|>", special=True) == [len(ranks) + 2]
    assert tok.encode("<|im_end|>") == ref.encode("<|im_end|>", disallowed_special=())
    assert len(tok.encode("<|im_end|>")) > 1
    # a merge learnt from the corpus applies: "你" is three bytes, merged into fewer ids
    assert ranks.get("你".encode()) is not None and tok.encode("你") == [ranks["你".encode()]]


def test_byte_bpe_learner_merges_most_frequent_pair():
    ranks = learn_byte_bpe(["aaab aaab aaab"], 1)
    assert len(ranks) == 257 and ranks[b"aa"] == 256


# --- chat formats without a template ---------------------------------------------------------------


def test_chatglm3_chat_layout(dirs):
    tok = load_tokenizer(dirs["chatglm"])
    n = tok.sp.GetPieceSize()
    gmask, sop, user, assistant = n + 1, n + 3, n + 6, n + 7
    nl = tok.sp.encode("\n")
    want = [gmask, sop, user, *nl, *tok.sp.encode("你好"), assistant, *nl, *tok.sp.encode("Hello!"),
            user, *nl, *tok.sp.encode("def f(x): return x"), assistant]
    assert render_chat(tok, CHAT) == want
    assert tok.vocab_size == n + 9 and tok.prefix == [gmask, sop]
    assert tok.decode(want).startswith("[gMASK]sop<|user|>")


def test_baichuan2_chat_layout(dirs):
    tok = load_tokenizer(dirs["baichuan"])
    assert tok.sp.IdToPiece(195) == "<reserved_106>" and tok.sp.IdToPiece(196) == "<reserved_107>"
    chat = [{"role": "system", "content": "Be brief."}, *CHAT]
    want = [*tok.sp.encode("Be brief."), 195, *tok.sp.encode("你好"), 196, *tok.sp.encode("Hello!"),
            195, *tok.sp.encode("def f(x): return x"), 196]
    assert render_chat(tok, chat) == want
    assert render_chat(tok, CHAT[:2]) == [195, *tok.sp.encode("你好"), 196, *tok.sp.encode("Hello!")]


def test_qwen_chatml_layout(dirs):
    tok = load_tokenizer(dirs["qwen"])
    start, end = tok.special_id("<|im_start|>"), tok.special_id("<|im_end|>")
    e = tok.encode
    want = [start, *e("system"), *e("\n"), *e("You are a helpful assistant."), end, *e("\n"),
            start, *e("user"), *e("\n"), *e("你好"), end, *e("\n"), start, *e("assistant"), *e("\n")]
    assert render_chat(tok, CHAT[:1]) == want
    assert tok.decode(want) == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                                "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n")


def test_template_rendering_is_sandboxed_and_raises(dirs, tmp_path):
    d = tmp_path / "t"
    d.mkdir()
    for f in ("tokenizer.json", "config.json"):
        (d / f).write_bytes((dirs["qwen2"] / f).read_bytes())
    cfg = {"chat_template": "{{ raise_exception('only user turns') }}"}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UsageError, match="only user turns"):
        render_chat(d, CHAT)
    cfg = {"chat_template": "{{ messages.__class__.__mro__ }}"}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UsageError, match="chat template fails"):
        render_chat(d, CHAT)


# --- bad input: one-line errors --------------------------------------------------------------------


def one_line(excinfo, *needles):
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, msg


def test_missing_and_corrupt_tokenizer_files(tmp_path, dirs):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError) as e:
        load_tokenizer(tmp_path / "empty")
    one_line(e, "holds no tokenizer", "tokenizer.json")
    for name, content in [("tokenizer.json", b'{"model": '), ("tokenizer.model", b"\x08\x99garbage"),
                          ("qwen.tiktoken", b"IQ== 0\nnot base64!! x\n")]:
        d = tmp_path / name.replace(".", "_")
        d.mkdir()
        (d / name).write_bytes(content)
        with pytest.raises(UsageError) as e:
            load_tokenizer(d)
        one_line(e, name)
    bad = tmp_path / "ranks"
    bad.mkdir()
    good = (dirs["qwen"] / "qwen.tiktoken").read_text().splitlines()
    (bad / "qwen.tiktoken").write_text("\n".join(good[:10] + ["QUJD"] + good[10:]))
    with pytest.raises(UsageError) as e:
        load_tokenizer(bad)
    one_line(e, "line 11")
    (bad / "qwen.tiktoken").write_text("\n".join(good[1:]))  # byte 0 missing
    with pytest.raises(UsageError) as e:
        load_tokenizer(bad)
    one_line(e, "ranks are not")


def test_prompts_file_errors(tmp_path):
    f = tmp_path / "p.jsonl"
    cases = [("", "holds no prompts"), ("\n  \n", "holds no prompts"), ('{"prompt": "a"}\n{"prompt": 1}\n', "line 2"),
             ('{"prompt": "a"}\n\n{bad json\n', "line 3"), ('{"text": "a"}\n', "line 1 is neither"),
             ('{"messages": [{"role": "user"}]}\n', "line 1: message 1"), ("[" * 100000 + "\n", "line 1"),
             ('{"prompt": ' + "9" * 5000 + "}\n", "line 1"), ('{"prompt": ""}\n', "empty")]
    for content, needle in cases:
        f.write_text(content)
        with pytest.raises(UsageError) as e:
            P.read_prompts(f)
        one_line(e, str(f), needle)
    f.write_text('{"prompt": "hi"}\n\n{"messages": [{"role": "user", "content": "yo"}]}\n')
    got = P.read_prompts(f)
    assert got[0].text == "hi" and got[1].messages == ({"role": "user", "content": "yo"},)


def test_prompt_longer_than_context(dirs):
    tok = load_tokenizer(dirs["chatglm"])  # config.json: seq_length 32
    assert P.context_length(dirs["chatglm"]) == 32
    long = P.Prompt(text="The quick brown fox jumps over the lazy dog. " * 10)
    with pytest.raises(UsageError) as e:
        P.encode_prompts(dirs["chatglm"], tok, [P.Prompt(text="hi"), long])
    one_line(e, "prompt 2 is", "tokens, the model's context is 32")
    assert P.encode_prompts(dirs["chatglm"], tok, [P.Prompt(text="hi")]) == [[*tok.prefix, *tok.encode("hi")]]


def test_builtin_prompts_cover_languages_and_fit(dirs):
    texts = " ".join(p.text or p.messages[-1]["content"] for p in P.BUILTIN_PROMPTS)
    assert "你好" in texts and "def " in texts and "France" in texts
    for family in ("qwen2", "qwen", "chatglm", "baichuan"):
        tok = load_tokenizer(dirs[family])
        ids = P.encode_prompts(dirs[family], tok, P.BUILTIN_PROMPTS, max_len=10**6)
        assert max(len(i) for i in ids) > 3 * min(len(i) for i in ids)  # one long prompt
        assert max(max(i) for i in ids) < MODEL_VOCAB
        for prompt, i in zip(P.BUILTIN_PROMPTS, ids):
            if prompt.text:
                assert tok.decode(i[len(tok.prefix):]) == prompt.text


# --- the CLI ---------------------------------------------------------------------------------------


def cli(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def assert_cli_error(result, *needles):
    code, _, err = result
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, (code, err)
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.mark.parametrize("family", ["qwen2", "qwen", "chatglm", "baichuan"])
def test_generate_text_in_text_out(tmp_path, capsys, family):
    d = checkpoint(tmp_path / family, family)
    code, out, err = cli(capsys, "generate", "--model", str(d), "--prompt", "你好", "--max-new-tokens", "4",
                         "--json", "--target", "numpy:cpu")
    assert code == 0, err
    record = json.loads(out)
    tok = load_tokenizer(d)
    assert record["prompt"] == [*tok.prefix, *tok.encode("你好")]
    assert len(record["new_tokens"]) == 4 and record["text"] == tok.decode(record["new_tokens"])
    # the same prompt as ids gives the same tokens
    code, out, _ = cli(capsys, "generate", "--model", str(d), "--input-ids", ",".join(map(str, record["prompt"])),
                       "--max-new-tokens", "4", "--json", "--target", "numpy:cpu")
    assert json.loads(out)["new_tokens"] == record["new_tokens"] and "text" not in json.loads(out)


def test_generate_and_infer_over_a_prompts_file(tmp_path, capsys):
    d = checkpoint(tmp_path / "ck", "qwen2")
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "The capital of France is"}\n\n{"messages": [{"role": "user", "content": "你好"}]}\n')
    code, out, err = cli(capsys, "generate", "--model", str(d), "--prompts", str(f), "--max-new-tokens", "2",
                         "--json")
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    tok = load_tokenizer(d)
    assert [r["prompt"] for r in records] == [tok.encode("The capital of France is"),
                                              render_chat(tok, [{"role": "user", "content": "你好"}])]
    assert_cli_error(cli(capsys, "infer", "--model", str(d), "--prompts", str(f), "--out", str(tmp_path / "x.npy")),
                     "2 prompts need --out to be an existing directory")
    (tmp_path / "logits").mkdir()
    code, _, err = cli(capsys, "infer", "--model", str(d), "--prompts", str(f), "--out", str(tmp_path / "logits"))
    assert code == 0, err
    first = np.load(tmp_path / "logits" / "prompt-1.npy")
    assert first.shape == (1, len(records[0]["prompt"]), MODEL_VOCAB)
    code, _, err = cli(capsys, "infer", "--model", str(d), "--prompt", "The capital of France is",
                       "--out", str(tmp_path / "one.npy"))
    assert code == 0, err
    np.testing.assert_array_equal(np.load(tmp_path / "one.npy"), first)


def test_cli_errors_are_one_line(tmp_path, capsys):
    d = checkpoint(tmp_path / "ck", "chatglm", seq_length=16)
    assert_cli_error(cli(capsys, "generate", "--model", "qwen2-tiny", "--prompt", "hi"),
                     "checkpoint directory", "--input-ids")
    assert_cli_error(cli(capsys, "generate", "--model", str(d), "--prompt", "The quick brown fox " * 8),
                     "--prompt is", "the model's context is 16")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert_cli_error(cli(capsys, "generate", "--model", str(d), "--prompts", str(empty)), "holds no prompts")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": \n')
    assert_cli_error(cli(capsys, "infer", "--model", str(d), "--prompts", str(bad), "--out", str(tmp_path)),
                     "bad.jsonl line 2")
    (d / "tokenizer.model").unlink()
    assert_cli_error(cli(capsys, "generate", "--model", str(d), "--prompt", "hi"), "holds no tokenizer")
    (d / "tokenizer.model").write_bytes(b"not a model")
    assert_cli_error(cli(capsys, "generate", "--model", str(d), "--prompt", "hi"), "not a valid SentencePiece")


def test_generate_subprocess_prints_text(tmp_path):
    d = checkpoint(tmp_path / "ck", "qwen2")
    r = run_cli("generate", "--model", str(d), "--prompt", "你好", "--max-new-tokens", "4", "--json")
    assert r.returncode == 0, r.stderr
    record = json.loads(r.stdout)
    assert len(record["new_tokens"]) == 4 and isinstance(record["text"], str)
    r = run_cli("generate", "--model", str(d), "--prompt", "你好", "--input-ids", "1,2")
    assert r.returncode == 2 and "not allowed with argument" in r.stderr


def test_generate_stops_at_an_end_token_unless_told_not_to(tmp_path, capsys):
    d = checkpoint(tmp_path / "ck", "qwen2")
    args = ["generate", "--model", str(d), "--prompt", "你好", "--max-new-tokens", "6", "--json", "--target",
            "numpy:cpu"]
    code, out, err = cli(capsys, *args, "--ignore-eos")
    assert code == 0, err
    full = json.loads(out)["new_tokens"]
    assert len(full) == 6 and not json.loads(out)["stopped_at_eos"]
    end = full[2]  # declared an end token in generation_config.json, as Qwen2-Instruct lists <|im_end|>
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [MODEL_VOCAB + 5, end]}))
    code, out, err = cli(capsys, *args)
    assert code == 0, err
    record = json.loads(out)
    cut = full.index(end) + 1
    assert record["new_tokens"] == full[:cut] and record["stopped_at_eos"]
    assert record["text"] == load_tokenizer(d).decode(full[:cut - 1])
