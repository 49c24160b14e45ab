"""The serving engine in process (no HTTP): continuous batching gives each request what `generate`
gives it alone, for every cache kind (GQA, a sliding window's rolling buffer, MLA's latent cache,
a looped core's per-call caches); requests join and leave without recompiling; a full queue is
refused; and the HTTP layer answers 429 for it."""
from __future__ import annotations

import threading

import pytest
from flax import nnx
from starlette.testclient import TestClient

from jaxllm.config import config_from_dict
from jaxllm.decode import GREEDY, Sampling, TiDAR, bucket, generate
from jaxllm.model import Transformer
from jaxllm.serve import engine as engine_module
from jaxllm.serve.app import make_app
from jaxllm.serve.engine import Engine, EngineFull, Params, wait_for
from jaxllm.train.tokenizer import CharTokenizer

TOKENIZER = CharTokenizer("abcdefghijklmnopqrstuvwxyz .,\n")
PROMPTS = ["the cat", "a", "once upon a time there", "xyz, abc", "hello world", "it is", "b c d e f g h i j k l m n o"]


def model_for(**fields) -> Transformer:
    base = dict(vocab_size=TOKENIZER.vocab_size, d_model=32, n_layer=2, max_seq_len=64, position=dict(kind="rope"),
                attention=dict(n_head=4, n_kv_head=2), init_std=0.3)
    return Transformer(config_from_dict({"model": {**base, **fields}}).model, rngs=nnx.Rngs(0))


def ask_concurrently(engine, jobs) -> list[dict]:
    """Each job (prompt, max_tokens, sampling, seed) from its own thread at once; their results in order."""
    results, errors = {}, []

    def ask(i, prompt, n, sampling, seed):
        try:
            results[i] = wait_for(engine, TOKENIZER.encode(prompt).tolist(), Params(n, sampling, seed=seed))[0]
        except BaseException as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(i, *job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    return [results[i] for i in range(len(jobs))]


def alone(model, prompt: str, n: int, sampling=GREEDY, seed: int = 0, **kwargs) -> str:
    """What `generate` decodes for one request by itself, as text."""
    ids = generate(model, [TOKENIZER.encode(prompt).tolist()], max_new_tokens=n, sampling=sampling, seed=seed, **kwargs)
    return TOKENIZER.decode(ids[0])


KINDS = {
    "gqa": {},
    "window": dict(attention=dict(n_head=4, n_kv_head=2, window=8)),
    "mla": dict(attention=dict(kind="mla", n_head=4, mla=dict(variant="deepseek", kv_lora_rank=16, q_lora_rank=16,
                                                               qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8))),
    "recursion": dict(n_layer=4, recursion=dict(mode="loop", n_prelude=1, n_core=2, n_loops=2)),
    "learned positions": dict(position=dict(kind="learned"), attention=dict(n_head=4)),
}


@pytest.mark.parametrize("kind,steps", [(kind, 1) for kind in KINDS] + [("gqa", 3)])
def test_concurrent_requests_decode_as_they_would_alone(kind, steps):
    """Each request's tokens equal `generate`'s for it alone; with several steps per engine call,
    sequences that end inside a call drop the tokens drawn after their end."""
    model = model_for(**KINDS[kind])
    engine = Engine(model, TOKENIZER, slots=3, steps_per_call=steps).start()
    try:
        jobs = [(p, 6 + 2 * i, GREEDY if i % 2 else Sampling(temperature=0.8, top_k=12), i)  # one decode bucket
                for i, p in enumerate(PROMPTS[:5])]
        results = ask_concurrently(engine, jobs)
        for i, job in enumerate(jobs):
            assert results[i]["text"] == alone(model, *job), (kind, job[0])
            assert results[i]["finish"] == "length"
    finally:
        engine.stop()


def test_requests_join_and_leave_without_recompiling_the_step():
    model = model_for()
    engine = Engine(model, TOKENIZER, slots=2)
    engine.warm_up()
    engine.start()
    try:
        step_compiles = engine_module._step._cache_size()
        lengths = set()
        for i, prompt in enumerate(PROMPTS):
            wait_for(engine, TOKENIZER.encode(prompt).tolist(), Params(3 + i, GREEDY))
            lengths.add(bucket(len(prompt)))
        assert engine_module._step._cache_size() == step_compiles  # one step for every request mix
        assert engine.steps > 0
    finally:
        engine.stop()
    assert lengths == {16, 32}


def test_eos_ends_a_sequence_and_the_context_bounds_it():
    model = model_for()
    ids = TOKENIZER.encode("the cat").tolist()
    greedy = generate(model, [ids], max_new_tokens=12, sampling=GREEDY)[0]
    engine = Engine(model, TOKENIZER, slots=2, eos_id=greedy[5]).start()
    try:
        out = wait_for(engine, ids, Params(12, GREEDY))[0]
        assert out["finish"] == "stop" and out["text"] == TOKENIZER.decode(greedy[:greedy.index(greedy[5])])
        out = wait_for(engine, ids, Params(12, GREEDY, ignore_eos=True))[0]
        assert out["text"] == TOKENIZER.decode(greedy)
        long = TOKENIZER.encode("a" * 60).tolist()  # 4 positions left in a context of 64
        out = wait_for(engine, long, Params(100, GREEDY, ignore_eos=True))[0]
        assert out["finish"] == "length" and len(out["tokens"]) == 4
    finally:
        engine.stop()


def test_a_full_queue_is_refused_and_the_server_answers_429():
    model = model_for()
    engine = Engine(model, TOKENIZER, slots=1, max_waiting=2)  # not started: nothing leaves the queue
    engine.submit([1, 2], Params(4, GREEDY, n=2), lambda event: None)
    with pytest.raises(EngineFull, match="busy"):
        engine.submit([1, 2], Params(4, GREEDY), lambda event: None)
    client = TestClient(make_app(engine, "tiny"))
    for stream in (False, True):
        response = client.post("/v1/completions", json={"model": "tiny", "prompt": "a", "stream": stream})
        assert response.status_code == 429
        assert response.json()["error"]["type"] == "rate_limit_error"
    assert client.get("/health").json()["waiting"] == 2


@pytest.fixture(scope="module")
def tidar_model():
    fields = dict(vocab_size=TOKENIZER.vocab_size + 1, d_model=32, n_layer=2, max_seq_len=64, position=dict(kind="rope"),
                  attention=dict(n_head=4), init_std=0.3, diffusion=dict(enabled=True, block_size=4))
    model = Transformer(config_from_dict({"model": fields}).model, rngs=nnx.Rngs(0))
    model.eval()
    return model


def test_tidar_self_speculation_serves_what_generate_decodes(tidar_model):
    """With beta 1, greedy self-speculative serving gives exactly the AR model's greedy tokens; a
    sampled request gives what `generate(speculative=...)` draws with the same seed; several
    requests share the slots; and the engine counts more than one token per forward."""
    model = tidar_model
    engine = Engine(model, TOKENIZER, slots=2, steps_per_call=2, speculative=TiDAR(4, 1.0)).start()
    try:
        jobs = [(p, 6 + 3 * i, GREEDY, 0) for i, p in enumerate(PROMPTS[:4])]
        results = ask_concurrently(engine, jobs)
        for i, job in enumerate(jobs):
            assert results[i]["text"] == alone(model, *job) and results[i]["finish"] == "length"
        sampling = Sampling(temperature=0.9)
        ids = TOKENIZER.encode("the cat").tolist()
        drawn = wait_for(engine, ids, Params(12, sampling, seed=5))[0]["text"]
        expected = generate(model, [ids], max_new_tokens=12, sampling=sampling, seed=5, speculative=TiDAR(4, 1.0))[0]
        assert drawn == TOKENIZER.decode(expected)
        assert engine.tokens_per_forward >= 1.0 and engine.forwards > 0
    finally:
        engine.stop()


def test_a_tidar_server_refuses_generated_logprobs_but_scores_prompts(tidar_model):
    engine = Engine(tidar_model, TOKENIZER, slots=1, speculative=TiDAR(4, 1.0)).start()
    try:
        client = TestClient(make_app(engine, "tidar"))
        response = client.post("/v1/completions", json={"model": "tidar", "prompt": "the cat", "logprobs": 1})
        assert response.status_code == 400 and "--speculative tidar" in response.json()["error"]["message"]
        scored = client.post("/v1/completions", json={"model": "tidar", "prompt": "the cat", "logprobs": 1,
                                                      "max_tokens": 0, "echo": True}).json()
        assert scored["choices"][0]["logprobs"]["token_logprobs"][0] is None
        assert len(scored["choices"][0]["logprobs"]["token_logprobs"]) == 7
        out = client.post("/v1/completions", json={"model": "tidar", "prompt": "the cat", "max_tokens": 9,
                                                   "temperature": 0}).json()
        alone = generate(tidar_model, [TOKENIZER.encode("the cat").tolist()], max_new_tokens=9, sampling=GREEDY)[0]
        assert out["choices"][0]["text"] == TOKENIZER.decode(alone)
        assert client.get("/health").json()["tokens_per_forward"] >= 1.0
    finally:
        engine.stop()


def test_a_hugging_face_chat_template_is_applied(tmp_path):
    """A directory whose tokenizer_config.json has a chat_template: chat requests are rendered and
    tokenized by it (transformers' apply_chat_template; no doubled BOS, no plain-template stop)."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from jaxllm.serve.api import ChatTemplate
    from jaxllm.train.tokenizer import load_tokenizer

    chars = list("abcdefghijklmnopqrstuvwxyz .,:\n<>|/")
    hf = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}},
                                    unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    hf.decoder = decoders.Fuse()
    hf.save(str(tmp_path / "tokenizer.json"))
    template = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(dict(
        tokenizer_class="PreTrainedTokenizerFast", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        chat_template=template)))
    assert ChatTemplate.found(tmp_path) and not ChatTemplate.found(tmp_path / "nowhere")
    tokenizer = load_tokenizer(tmp_path / "tokenizer.json")
    model = Transformer(config_from_dict({"model": dict(
        vocab_size=tokenizer.vocab_size, d_model=32, n_layer=2, max_seq_len=64, position=dict(kind="rope"),
        attention=dict(n_head=4), init_std=0.3)}).model, rngs=nnx.Rngs(0))
    engine = Engine(model, tokenizer, slots=2, eos_id=2).start()
    try:
        client = TestClient(make_app(engine, "hf", ChatTemplate(tmp_path)))
        out = client.post("/v1/chat/completions", json={"model": "hf", "max_tokens": 8, "temperature": 0,
                                                        "messages": [{"role": "user", "content": "hi cat"}]}).json()
        ids = [1] + tokenizer.encode("<|user|>hi cat").tolist() + [2] + tokenizer.encode("<|assistant|>").tolist()
        assert ids.count(1) == 1  # one BOS
        alone = generate(model, [ids], max_new_tokens=8, sampling=GREEDY, eos_id=2)[0]
        expected = tokenizer.decode([t for t in alone if t != 2])
        assert out["choices"][0]["message"]["content"] == expected
        assert out["usage"]["prompt_tokens"] == len(ids)
    finally:
        engine.stop()
