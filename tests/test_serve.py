"""`jaxllm serve`: the real server (scripts/serve.py in a subprocess on a free port of 127.0.0.1)
talked to with the official `openai` client and raw HTTP: completions and chat, streaming and
not, stop strings, seeds, n, logprobs/echo, 16 concurrent clients on 4 slots, a client that leaves
mid-stream, bad requests, and a graceful stop on SIGTERM. The reference for every answer is
`jaxllm.decode.generate` (one request at a time) or `scripts/sample.py` on the same weights."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import jax
import numpy as np
import pytest
from flax import nnx

from jaxllm.cli import main as jaxllm_main
from jaxllm.config import config_from_dict, to_dict
from jaxllm.convert import save_safetensors
from jaxllm.decode import GREEDY, Sampling, generate
from jaxllm.model import Transformer
from jaxllm.serve.api import chat_prompt, Message
from jaxllm.train.tokenizer import CharTokenizer

openai = pytest.importorskip("openai", reason="the openai client is a test dependency (pip install openai)")

ROOT = Path(__file__).resolve().parents[1]
CHARS = "abcdefghijklmnopqrstuvwxyzASU:., \n"
CONTEXT = 64


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(base URL, model, tokenizer, weights path): a small random model behind a 4-slot server."""
    directory = tmp_path_factory.mktemp("serve")
    tokenizer = CharTokenizer(CHARS)
    cfg = config_from_dict({"model": dict(vocab_size=tokenizer.vocab_size, d_model=32, n_layer=2,
                                          max_seq_len=CONTEXT, position=dict(kind="rope"),
                                          attention=dict(n_head=4, n_kv_head=2), init_std=0.3)}).model
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    save_safetensors(directory / "tiny.safetensors", model, config=to_dict(cfg))
    tokenizer.save(directory / "tokenizer.json")
    port = free_port()
    log = open(directory / "server.log", "w+")
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts/serve.py"), "--checkpoint",
                             str(directory / "tiny.safetensors"), "--port", str(port), "--slots", "4"],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            log.seek(0)
            proc.kill()
            pytest.fail(f"the server did not start:\n{log.read()}")
        time.sleep(0.3)
    yield base, model, tokenizer, directory / "tiny.safetensors"
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=60)
    finally:
        proc.kill()
    log.seek(0)
    assert code == 0, f"SIGTERM should stop the server cleanly (exit 0), got {code}:\n{log.read()}"


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served[0]}/v1", api_key="none", max_retries=0, timeout=120)


def reference(model, tokenizer, prompt: str, n: int, sampling: Sampling = GREEDY, seed: int = 0) -> str:
    """What one request alone decodes to: `generate` on the prompt's ids, as text."""
    ids = generate(model, [tokenizer.encode(prompt).tolist()], max_new_tokens=n, sampling=sampling, seed=seed)[0]
    return tokenizer.decode(ids)


def test_models_and_health(served, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    health = httpx.get(f"{served[0]}/health").json()
    assert health["status"] == "ok" and health["slots"] == 4


def test_greedy_completion_equals_generate_and_sample_script(served, client, capsys):
    _, model, tokenizer, path = served
    out = client.completions.create(model="tiny", prompt="the cat", max_tokens=20, temperature=0)
    expected = reference(model, tokenizer, "the cat", 20)
    assert out.choices[0].text == expected
    assert out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == 7 and out.usage.completion_tokens == 20
    code = jaxllm_main(["sample", "--checkpoint", str(path), "--prompt", "the cat", "--temperature", "0",
                        "--max-new-tokens", "20", "--no-stream"])
    assert code == 0
    assert capsys.readouterr().out == "the cat" + out.choices[0].text + "\n"


def test_streaming_completion_is_the_same_text_with_finish_reason_on_the_last_chunk(served, client):
    _, model, tokenizer, _ = served
    chunks = list(client.completions.create(model="tiny", prompt="hello world", max_tokens=15, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    content = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in content) == reference(model, tokenizer, "hello world", 15)
    assert [c.choices[0].finish_reason for c in content] == [None] * (len(content) - 1) + ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 15
    assert len({c.id for c in chunks}) == 1 and all(c.object == "text_completion" for c in chunks)


def test_chat_streaming_and_not(served, client):
    _, model, tokenizer, _ = served
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi cat"}]
    prompt = chat_prompt([Message(**m) for m in messages])
    assert prompt == "System: be brief\nUser: hi cat\nAssistant:"
    full = reference(model, tokenizer, prompt, 12)
    expected = full.split("\nUser:")[0]  # the template's own stop: a new user turn
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == expected
    assert out.choices[0].finish_reason == ("stop" if expected != full else "length")
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == out.choices[0].finish_reason


def test_stop_strings_end_the_text_before_them(served, client):
    _, model, tokenizer, _ = served
    full = reference(model, tokenizer, "once upon", 30)
    stop = full[8:10]  # two characters the greedy text reaches after 8
    cut = full[:full.find(stop)]
    for stream in (False, True):
        out = client.completions.create(model="tiny", prompt="once upon", max_tokens=30, temperature=0,
                                        stop=[stop, "zzzz"], stream=stream)
        if stream:
            chunks = list(out)
            text, finish = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
        else:
            text, finish = out.choices[0].text, out.choices[0].finish_reason
        assert (text, finish) == (cut, "stop")


def test_seeded_sampling_is_reproducible_and_n_gives_seed_plus_i(served, client):
    _, model, tokenizer, _ = served
    kwargs = dict(model="tiny", prompt="the dog", max_tokens=25, temperature=0.9, top_p=0.95, seed=11)
    a = client.completions.create(**kwargs).choices[0].text
    b = client.completions.create(**kwargs).choices[0].text
    assert a == b == reference(model, tokenizer, "the dog", 25, Sampling(temperature=0.9, top_p=0.95), seed=11)
    other = client.completions.create(**{**kwargs, "seed": 12}).choices[0].text
    assert other != a
    two = client.completions.create(**{**kwargs, "n": 2})
    assert [c.index for c in two.choices] == [0, 1]
    assert [c.text for c in two.choices] == [a, other]


def test_echo_with_logprobs_scores_the_prompt_as_lm_eval_reads_it(served, client):
    """lm-eval-harness's local-completions loglikelihood request: echo, logprobs=1, max_tokens=1."""
    _, model, tokenizer, _ = served
    prompt = "the cat sat"
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=1, temperature=0, echo=True, logprobs=1)
    lp = out.choices[0].logprobs
    ids = tokenizer.encode(prompt)
    logits = np.asarray(jax.nn.log_softmax(model(ids[None])[0], axis=-1))
    expected = [logits[i, ids[i + 1]] for i in range(len(ids) - 1)]
    assert lp.token_logprobs[0] is None
    np.testing.assert_allclose(lp.token_logprobs[1:len(ids)], expected, atol=1e-5)
    assert out.choices[0].text.startswith(prompt) and lp.tokens[:len(ids)] == list(prompt)
    greedy_next = tokenizer.decode([int(np.argmax(logits[-1]))])
    assert lp.tokens[-1] == greedy_next and lp.top_logprobs[-1] == {greedy_next: pytest.approx(logits[-1].max(), abs=1e-5)}
    assert lp.text_offset[:3] == [0, 1, 2]
    scored = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=0)
    assert scored.choices[0].text == prompt and scored.usage.completion_tokens == 0


def test_sixteen_clients_on_four_slots_get_what_one_at_a_time_gets(served, client):
    _, model, tokenizer, _ = served
    prompts = [f"{w} {v}" for w in ("the", "a", "one", "cats") for v in ("sat", "ran", "is", "dog")]
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def ask(i: int) -> None:
        try:
            if i % 2:
                chunks = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=10 + i,
                                                   temperature=0, stream=True)
                results[i] = "".join(c.choices[0].text for c in chunks)
            else:
                results[i] = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=10 + i,
                                                       temperature=0).choices[0].text
        except BaseException as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert sorted(results) == list(range(16))
    for i, prompt in enumerate(prompts):
        assert results[i] == reference(model, tokenizer, prompt, 10 + i), prompt
    health = httpx.get(f"{served[0]}/health").json()
    assert health["busy"] == 0 and health["waiting"] == 0


def test_a_client_leaving_mid_stream_frees_its_slot(served, client):
    base, model, tokenizer, _ = served
    body = {"model": "tiny", "prompt": "the cat", "max_tokens": 50, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as response:
        first = next(response.iter_lines())
        assert first.startswith("data: ")
    # the server keeps serving, and the abandoned sequence leaves its slot
    out = client.completions.create(model="tiny", prompt="a dog", max_tokens=10, temperature=0)
    assert out.choices[0].text == reference(model, tokenizer, "a dog", 10)
    deadline = time.monotonic() + 30
    while httpx.get(f"{base}/health").json()["busy"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert httpx.get(f"{base}/health").json()["busy"] == 0


BAD = [
    (b'{"model": "tiny", "prompt": "a",', "not valid JSON"),
    (b'[1, 2]', "JSON object"),
    ({"model": "gpt-4", "prompt": "a"}, "model 'gpt-4' does not exist"),
    ({"model": "tiny", "prompt": "a", "max_tokens": -1}, "max_tokens"),
    ({"model": "tiny", "prompt": "a", "temperature": -0.5}, "temperature"),
    ({"model": "tiny", "prompt": "a", "top_p": 0}, "top_p"),
    ({"model": "tiny", "prompt": ""}, "empty"),
    ({"model": "tiny", "prompt": []}, "empty"),
    ({"model": "tiny", "prompt": "a" * CONTEXT}, f"context is {CONTEXT} tokens"),
    ({"model": "tiny", "prompt": [1, 2, 999]}, "token id 999"),
    ({"model": "tiny", "prompt": "HELLO"}, "outside the vocabulary"),
    ({"prompt": "a"}, "model: Field required"),
    ({"model": "tiny", "prompt": "a", "presence_penalty": 1}, "presence_penalty is not supported"),
    ({"model": "tiny", "prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, "at most 4"),
]


@pytest.mark.parametrize("body,message", BAD, ids=[m for _, m in BAD])
def test_bad_requests_are_400_with_one_line_and_the_server_stays_up(served, body, message):
    base = served[0]
    kwargs = dict(content=body) if isinstance(body, bytes) else dict(json=body)
    response = httpx.post(f"{base}/v1/completions", timeout=30, **kwargs)
    assert response.status_code == 400
    error = response.json()["error"]
    assert message in error["message"] and "\n" not in error["message"] and "Traceback" not in response.text
    assert error["type"] == "invalid_request_error"
    assert httpx.get(f"{base}/health").json()["status"] == "ok"


def test_bad_chat_requests_and_unknown_routes(served):
    base = served[0]
    for body, message in [({"model": "tiny", "messages": []}, "messages"),
                          ({"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}, "role"),
                          ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 50},
                           "top_logprobs")]:
        response = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=30)
        assert response.status_code == 400 and message in response.json()["error"]["message"]
    response = httpx.get(f"{base}/v1/nothing")
    assert response.status_code == 404 and "error" in response.json()
    assert httpx.get(f"{base}/v1/completions").status_code == 405


def test_openai_client_sees_errors_as_bad_request(served, client):
    with pytest.raises(openai.BadRequestError, match="context is 64 tokens"):
        client.completions.create(model="tiny", prompt="a" * 100, max_tokens=1)


def test_cli_misuse_is_one_line_and_exit_2(served, capsys):
    base, _, _, path = served
    port = base.rsplit(":", 1)[1]
    cases = [(["--checkpoint", str(path), "--port", port], "cannot listen on 127.0.0.1:" + port),
             (["--checkpoint", str(path), "--port", str(free_port()), "--block", "4"], "only applies with --speculative"),
             (["--checkpoint", str(path), "--port", str(free_port()), "--speculative", "tidar"], "no diffusion head"),
             (["--checkpoint", str(path.parent / "missing.safetensors"), "--port", str(free_port())], "missing.safetensors"),
             (["--run", str(path.parent), "--port", str(free_port())], "not a run directory"),
             (["--checkpoint", str(path), "--slots", "0"], "--slots")]
    for args, message in cases:
        try:
            code = jaxllm_main(["serve", *args])
        except SystemExit as e:  # argparse's own one-line errors
            code = e.code
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (args, err)
