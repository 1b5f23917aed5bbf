"""Tests of runtime/evaluate.py and `llmc eval`: perplexity against the un-paged forward, GSM8K parsing, memory."""
import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

from lowering import compile_model
from lowering.checkpoints import Tokenizer
from lowering.checkpoints.tokenizer import byte_to_unicode
from lowering.ir import dtype_itemsize
from lowering.models import llama
from runtime import cli, evaluate as ev
from tests.lowering.helpers import tiny_config

MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o u", "Ġ s"]
TEXT = ("the quick brown fox jumps over the lazy dog, and then the dog sleeps in the sun. "
        "Where are you going? Into the woods, with a bag of apples and three silver coins. ") * 4


def tiny_tokenizer() -> Tokenizer:
    """Byte-level BPE: <|endoftext|> (eos), the 256 byte symbols, one token per merge; adds no BOS."""
    tokens = ["<|endoftext|>"] + [byte_to_unicode()[b] for b in range(256)] + [m.replace(" ", "") for m in MERGES]
    return Tokenizer.from_gguf_metadata({
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": MERGES, "tokenizer.ggml.token_type": [3] + [1] * (len(tokens) - 1),
        "tokenizer.ggml.eos_token_id": 0,
    })


@pytest.fixture(scope="module")
def tiny():
    """(flax model, compiled model) of a 2-layer random Llama over the tiny tokenizer; block size 4."""
    tok = tiny_tokenizer()
    model = llama.build_model(tiny_config(vocab_size=tok.vocab_size, max_position_embeddings=256), seed=11)
    cm = compile_model(model, block_size=4, max_model_len=256, tokenizer=tok, progress=False)
    return model, cm


def reference_ppl(model, token_ids, window, num_windows):
    """Each window through the un-paged Flax forward, logits for every row, NLL with numpy."""
    ids = np.asarray(token_ids[: window * num_windows], np.int32).reshape(num_windows, window)
    total = 0.0
    for w in ids:
        logits = np.asarray(model(jnp.asarray(w), jnp.arange(window, dtype=jnp.int32),
                                  jnp.asarray([0, window], jnp.int32), jnp.arange(window, dtype=jnp.int32)),
                            np.float64)[:-1]
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        total -= logp[np.arange(window - 1), w[1:]].sum()
    return math.exp(total / (num_windows * (window - 1)))


# ---------------------------------------------------------------------------------------------
# Perplexity


def test_perplexity_matches_the_unpaged_forward_and_is_batch_invariant(tiny):
    model, cm = tiny
    ids = cm.tokenizer.encode(TEXT)
    assert len(ids) >= 5 * 30 and ids == cm.tokenizer.encode(TEXT, add_special_tokens=False)  # no BOS added
    want = reference_ppl(model, ids, 30, 5)  # 30 tokens: windows end mid-block (block size 4)
    one = ev.perplexity(cm, TEXT, window=30, num_windows=5, batch_windows=1)
    three = ev.perplexity(cm, TEXT, window=30, num_windows=5, batch_windows=3)
    assert one.ppl == pytest.approx(want, rel=1e-5) and three.ppl == pytest.approx(want, rel=1e-5)
    assert three.num_windows == 5 and three.window == 30 and three.num_tokens == 5 * 29
    assert len(three.window_nll) == 5 and np.allclose(one.window_nll, three.window_nll, rtol=1e-5)
    assert three.nll == pytest.approx(math.log(three.ppl))
    assert 1 < three.ppl < 2 * cm.tokenizer.vocab_size  # a random model: near-uniform
    assert json.loads(json.dumps(three.to_json()))["ppl"] == three.ppl


def test_perplexity_on_a_given_program_and_a_short_text(tiny):
    _, cm = tiny
    program = cm.make_program(num_blocks=20, max_num_seqs=4, max_model_len=64)
    ids = cm.tokenizer.encode(TEXT)
    got = ev.perplexity(cm, TEXT, window=32, num_windows=1000, batch_windows=8, program=program)
    assert got.num_windows == len(ids) // 32  # fewer windows than asked: the ones the text has
    want = ev.perplexity(cm, TEXT, window=32, num_windows=1000, batch_windows=2)
    assert got.ppl == pytest.approx(want.ppl, rel=1e-5)


@pytest.mark.parametrize("kwargs, text, message", [
    ({"window": 1}, TEXT, "window must be an integer >= 2"),
    ({"num_windows": 0}, TEXT, "num_windows must be an integer >= 1"),
    ({"batch_windows": 0}, TEXT, "batch_windows must be an integer >= 1"),
    ({}, "", "non-empty text"),
    ({"window": 64}, "the end", "fewer than one window of 64"),
    ({"window": 1000}, TEXT, "exceeds the model's max_position_embeddings=256"),
])
def test_perplexity_bad_input(tiny, kwargs, text, message):
    with pytest.raises(ValueError, match=message):
        ev.perplexity(tiny[1], text, **kwargs)


def test_window_step_gives_every_window_its_own_blocks():
    step = ev.window_step(np.arange(14, dtype=np.int32).reshape(2, 7), block_size=4)
    step.validate(block_size=4, num_blocks=4)
    assert step.block_tables.tolist() == [[0, 1], [2, 3]]
    assert step.slot_mapping.tolist() == [0, 1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14]
    assert step.logit_rows.tolist() == list(range(14)) and step.query_start.tolist() == [0, 7, 14]


# ---------------------------------------------------------------------------------------------
# GSM8K


@pytest.mark.parametrize("completion, expected", [
    ("She sold 48 + 24 = 72 clips.\n#### 72", "72"),
    ("#### 1,234 and later 5", "1234"),
    ("The total is $1,250.50.", "1250.5"),
    ("It costs $18.", "18"),
    ("First 3, then 4.0", "4"),
    ("The change is -7 degrees", "-7"),
    ("So 0.25 of them, i.e. .5", "0.5"),
    ("#### $-3.10", "-3.1"),
    ("no number here", None),
    ("####", None),
])
def test_extract_answer(completion, expected):
    assert ev.extract_answer(completion) == expected


def test_reference_and_prompt():
    answer = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nSo 48+24 = <<48+24=72>>72.\n#### 1,072"
    assert ev.reference_answer(answer) == "1072"
    with pytest.raises(ValueError, match="does not end in '#### <number>'"):
        ev.reference_answer("no final answer")
    prompt = ev.gsm8k_prompt("How many?", [{"question": "Q1?", "answer": answer}])
    assert prompt == ("Question: Q1?\nAnswer: Natalia sold 48/2 = 24 clips in May.\nSo 48+24 = 72.\n#### 1,072\n\n"
                      "Question: How many?\nAnswer:")
    assert ev.gsm8k_prompt("Q", []) == "Question: Q\nAnswer:"


def write_jsonl(path, n):
    rows = [{"question": f"Tom has {i} apples and gets {i + 1} more. How many?",
             "answer": f"{i} + {i + 1} = <<{i}+{i + 1}={2 * i + 1}>>{2 * i + 1}\n#### {2 * i + 1}"} for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return rows


def test_gsm8k_end_to_end_on_the_tiny_model(tiny, tmp_path):
    _, cm = tiny
    path = tmp_path / "g.jsonl"
    write_jsonl(path, 5)
    res = ev.gsm8k_accuracy(cm, path, num_problems=2, shots=2, max_tokens=6, batch=2)
    assert res.total == 2 and res.shots == 2 and [r.id for r in res.records] == [2, 3]
    assert [r.reference for r in res.records] == ["5", "7"]
    assert res.correct == sum(r.correct for r in res.records) and res.accuracy == res.correct / 2
    for r in res.records:
        assert r.predicted == ev.extract_answer(r.completion) and "Question:" not in r.completion
    assert json.loads(json.dumps(res.to_json()))["records"][0]["question"].startswith("Tom has 2")


def test_gsm8k_bad_files(tiny, tmp_path):
    cm = tiny[1]
    with pytest.raises(FileNotFoundError, match="--data DIR"):
        ev.gsm8k_accuracy(cm, tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "#### 1"}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        ev.gsm8k_accuracy(cm, bad)
    bad.write_text('{"question": "q"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: expected an object"):
        ev.gsm8k_accuracy(cm, bad)
    write_jsonl(bad, 3)
    with pytest.raises(ValueError, match="3 records, fewer than shots \\+ num_problems = 36"):
        ev.gsm8k_accuracy(cm, bad)


# ---------------------------------------------------------------------------------------------
# Memory, data files, report


def test_memory_report(tiny):
    _, cm = tiny
    cfg = cm.config
    mem = ev.memory_report(cm)
    assert mem["weight_bytes"] == sum(v.nbytes for v in cm.params.values())
    assert mem["weight_bytes_by_dtype"] == {"float32": mem["weight_bytes"]}
    # K and V per layer: num_kv_heads * head_dim float32 values per token
    assert mem["kv_bytes_per_token"] == cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 4 == 256
    assert mem["kv_bytes_per_block"] == 4 * 256 and mem["num_kv_buffers"] == 4 and mem["num_layers"] == 2
    program = cm.make_program(num_blocks=10, max_num_seqs=2, max_model_len=32)
    with_program = ev.memory_report(cm, program)
    assert with_program["kv_cache_bytes"] == 10 * 4 * 256 and with_program["num_blocks"] == 10
    assert dtype_itemsize("float8_e4m3fn") == 1 and dtype_itemsize("bfloat16") == 2  # lowering.ir


def test_data_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("LLMC_DATA", raising=False)
    assert ev.default_data_dir().parts[-2:] == ("shared", "data")
    monkeypatch.setenv("LLMC_DATA", str(tmp_path))
    assert ev.default_data_dir() == tmp_path
    with pytest.raises(FileNotFoundError, match="tinyshakespeare.txt not found at .*--data DIR.*LLMC_DATA"):
        ev.data_file(ev.PPL_FILE)
    (tmp_path / ev.PPL_FILE).write_text("x")
    assert ev.data_file(ev.PPL_FILE) == tmp_path / ev.PPL_FILE


def test_evaluate_and_report(tiny, tmp_path):
    _, cm = tiny
    text, data = tmp_path / "t.txt", tmp_path / "g.jsonl"
    text.write_text(TEXT)
    write_jsonl(data, 3)
    result = ev.evaluate(cm, ppl_text_path=text, gsm8k_path=data, ppl_window=16, ppl_num_windows=2,
                         gsm8k_problems=1, gsm8k_shots=1, max_tokens=3)
    assert set(result) == {"memory", "seconds", "ppl", "gsm8k"} and set(result["seconds"]) == {"ppl", "gsm8k"}
    report = ev.format_report(result)
    assert "perplexity" in report and "gsm8k accuracy" in report and "kv cache / token" in report
    assert f"{result['ppl']['ppl']:.4f}" in report and "256 B" in report
    json.dumps(result)


# ---------------------------------------------------------------------------------------------
# CLI


def test_cli_eval_on_an_exported_artifact(tiny, tmp_path, capsys):
    _, cm = tiny
    art = cm.export(tmp_path / "art")
    data = tmp_path / "data"
    data.mkdir()
    (data / ev.PPL_FILE).write_text(TEXT)
    out = tmp_path / "r.json"
    argv = ["eval", str(art), "--tasks", "ppl", "--data", str(data), "--ppl-windows", "3", "--ppl-window", "24",
            "--json", str(out)]
    assert cli.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["tasks"] == ["ppl"] and "gsm8k" not in result
    assert result["ppl"]["num_windows"] == 3 and result["memory"]["kv_bytes_per_token"] == 256
    want = ev.perplexity(cm, TEXT, window=24, num_windows=3)
    assert result["ppl"]["ppl"] == pytest.approx(want.ppl, rel=1e-5)
    assert "perplexity" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--tasks", "ppl,mmlu"], "--tasks: unknown task 'mmlu'; choose from ppl, gsm8k"),
    (["--tasks", ","], "--tasks: no task given"),
    (["--ppl-window", "1"], "--ppl-window must be >= 2, got 1"),
    (["--data", "/definitely/missing"], "tinyshakespeare.txt not found at /definitely/missing/tinyshakespeare.txt"),
])
def test_cli_eval_bad_arguments(capsys, extra, message):
    assert cli.main(["eval", "/nowhere"] + extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("llmc: error: ") and message in err
