"""The training loop: accumulation, resume, checkpoints, curriculum, outputs, loading a run for
inference, and CLI errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import yaml
from flax import nnx

from jaxllm.checkpoint import Checkpointer, inference_mesh, load_model
from jaxllm.cli import run
from jaxllm.config import TrainConfig, load_config
from jaxllm.errors import DataError
from jaxllm.sharding import make_mesh
from jaxllm.train.loop import Trainer, train

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["model.n_layer=1", "model.max_seq_len=32", "train.seq_len=32", "train.batch_size=8",
         "train.warmup_steps=2", "train.eval_batches=2", "train.sample_every=0", "train.mesh=data:8"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """About 40k characters of varied text, written by the test (no download)."""
    rng = np.random.default_rng(0)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "and", "runs", "far", "away", "é", "ß"]
    lines = [" ".join(rng.choice(words, size=12)) + "." for _ in range(600)]
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def cfg_for(corpus, *overrides):
    return load_config(ROOT / "configs/tiny-gpt.yaml", [*SMALL, f"train.data={corpus}", *overrides])


def float_leaves(tree) -> list:
    return [x for x in jax.tree.leaves(tree) if jax.numpy.issubdtype(x.dtype, jax.numpy.floating)]


def test_gradient_accumulation_4x2_equals_a_batch_of_8():
    cfg1 = load_config(ROOT / "configs/tiny-gpt.yaml", SMALL + ["train.max_steps=10"])
    cfg4 = load_config(ROOT / "configs/tiny-gpt.yaml", SMALL + ["train.max_steps=10", "train.grad_accum=4"])
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, cfg1.model.vocab_size, (8, 33), dtype=np.int32) for _ in range(3)]
    mesh = make_mesh("data:1", jax.devices()[:1])
    with jax.set_mesh(mesh):
        whole, accumulated = Trainer(cfg1, mesh), Trainer(cfg4, mesh)
        initial = [np.asarray(x) for x in float_leaves(whole.state[0])]  # copied before donation
        for batch in batches:
            whole.state, *_ = whole.train_step(whole.state, whole.put(batch))
            for micro in np.split(batch, 4):
                accumulated.state, *_ = accumulated.train_step(accumulated.state, accumulated.put(micro))
    moved = 0
    for a, b, c in zip(float_leaves(whole.state[0]), float_leaves(accumulated.state[0]), initial, strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
        moved += not np.allclose(np.asarray(a), c)
    assert moved > 5  # the parameters did change: three real updates, not three no-ops


def test_logged_grad_norm_with_accumulation_is_the_norm_of_the_whole_batch_gradient(corpus, tmp_path):
    """grad_accum=4 micro-batches of 8 sequences: the logged grad_norm is that of the accumulated gradient
    (the mean of the 4 micro-batch gradients = the gradient of the batch of 32 at the same parameters),
    not that of the last micro-batch."""
    import optax

    from jaxllm.model import lm_loss
    from jaxllm.train import data as data_lib
    from jaxllm.train.loop import prepare_run_dir

    cfg = cfg_for(corpus, "train.max_steps=1", "train.warmup_steps=0", "train.log_every=1", "train.batch_size=32",
                  "train.grad_accum=4")
    logged = train(cfg, tmp_path, progress=False)["grad_norm"]
    run_cfg, _, tokens = prepare_run_dir(cfg, tmp_path)  # the same tokens, read back
    stream = data_lib.train_iterator(data_lib.split(tokens, cfg.train.val_fraction)[0], 32, 8, cfg.train.seed)
    batch = np.concatenate([next(stream) for _ in range(4)])  # the step's 4 micro-batches, as one batch of 32
    mesh = make_mesh("data:1", jax.devices()[:1])
    with jax.set_mesh(mesh):
        initial = Trainer(run_cfg, mesh)  # the parameters the run started from (the same seed)
        model, _ = nnx.merge(initial.graphdef, initial.state)
    norm = lambda rows: float(optax.tree.norm(nnx.grad(lm_loss)(model, rows[:, :-1], rows[:, 1:])))  # noqa: E731
    np.testing.assert_allclose(logged, norm(batch), rtol=1e-5)
    assert abs(norm(batch[-8:]) - logged) > 1e-3 * logged  # the last micro-batch's norm alone differs


def as_numbers(x) -> np.ndarray:
    return np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x)


def read_params(run_dir: Path, step: int) -> dict:
    return ocp.StandardCheckpointer().restore((run_dir / "checkpoints" / str(step) / "state").absolute())


def test_resume_after_step_k_reproduces_the_uninterrupted_run_bit_for_bit(corpus, tmp_path):
    # dropout on: the resumed run must also restore the RNG streams, not just params and data
    cfg = cfg_for(corpus, "train.max_steps=6", "train.eval_every=3", "train.checkpoint_every=100",
                  "train.log_every=1", "model.dropout=0.1")
    whole = train(cfg, tmp_path / "whole", progress=False)
    train(cfg, tmp_path / "split", progress=False, stop_after=3)
    assert sorted(os.listdir(tmp_path / "split" / "checkpoints")) == ["3"]
    resumed = train(cfg, tmp_path / "split", progress=False)
    timeless = lambda record: {k: v for k, v in record.items() if k != "tokens_per_s"}  # noqa: E731
    assert timeless(resumed) == timeless(whole)
    a, b = read_params(tmp_path / "whole", 6), read_params(tmp_path / "split", 6)
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b) > 10
    for x, y in zip(leaves_a, leaves_b):  # parameters, Adam moments, step counts, dropout RNG keys
        assert np.array_equal(as_numbers(x), as_numbers(y))
    records = [[timeless(json.loads(line)) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
               for run in ("whole", "split")]
    assert records[0] == records[1] and len(records[0]) == 6


def test_max_minutes_stops_at_the_first_log_step_past_the_limit_with_a_checkpoint(corpus, tmp_path):
    # 1e-6 minutes is over by the end of the first step: the run stops at the first log step (2),
    # saves there although checkpoint_every is far off, and says why
    cfg = cfg_for(corpus, "train.max_steps=50", "train.eval_every=100", "train.checkpoint_every=100",
                  "train.log_every=2", "train.max_minutes=1e-6")
    result = train(cfg, tmp_path / "run", progress=False)
    assert result["step"] == 2 and result["stopped_by"] == "train.max_minutes"
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["2"]
    resumed = train(load_config(ROOT / "configs/tiny-gpt.yaml", [*SMALL, f"train.data={corpus}", "train.max_steps=4",
                                                                 "train.eval_every=100", "train.checkpoint_every=100",
                                                                 "train.log_every=2"]), tmp_path / "run", progress=False)
    assert resumed["step"] == 4 and "stopped_by" not in resumed


FINISHED = ["train.max_steps=8", "train.eval_every=4", "train.log_every=2", "train.checkpoint_every=4", "train.lr=3e-3"]


@pytest.fixture(scope="module")
def finished_run(corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("finished")
    return run_dir, train(cfg_for(corpus, *FINISHED), run_dir, progress=False)


def test_run_directory_holds_config_tokenizer_metrics_plot_and_checkpoints(corpus, finished_run):
    tmp_path, last = finished_run
    saved = load_config(tmp_path / "config.yaml")
    distinct = set(corpus.read_text(encoding="utf-8")) | {"\ufffd"}
    assert saved.model.vocab_size == len(distinct)  # the vocabulary comes from the tokenizer
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [2, 4, 6, 8]
    assert [r["step"] for r in records if "val_loss" in r] == [4, 8]
    assert records[-1]["val_loss"] == last["val_loss"] and records[-1]["mfu"] is None  # CPU: MFU n/a
    assert abs(records[-1]["val_ppl"] - np.exp(records[-1]["val_loss"])) < 1e-6 * records[-1]["val_ppl"]
    train_losses = [r["loss"] for r in records if "loss" in r]
    assert train_losses[-1] < train_losses[0] < 1.1 * np.log(saved.model.vocab_size)
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4", "8"]
    assert json.loads((tmp_path / "tokenizer.json").read_text())["type"] == "char"


def test_checkpoints_keep_the_last_k_plus_the_best_by_validation_loss(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=2)
    import grain

    iterator = iter(grain.MapDataset.range(10).to_iter_dataset())
    for step, val_loss in zip(range(1, 6), [5.0, 1.0, 4.0, None, 3.0]):
        ckpt.save(step, {"w": np.full(3, step, np.float32)}, iterator, {"step": step}, val_loss)
    ckpt.close()
    assert sorted(Checkpointer(tmp_path, keep=2).all_steps()) == [2, 4, 5]


def flat_by_name(tree) -> dict:
    """{'embed_tokens/weight': array, ...} of an nnx state or of orbax's raw nested dicts alike."""
    def name(key):
        return str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key))))

    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        names = [name(k) for k in path]
        out["/".join(names[:-1] if names[-1] == "value" else names)] = as_numbers(x)
    return out


def test_loading_for_inference_restores_the_trained_model_alone(finished_run, monkeypatch):
    """load_model builds no optimizer, asks orbax for the model's subtree only, and holds about 1x
    the model's bytes afterwards (the AdamW moments would be 2x more); the weights are the trained ones."""
    run_dir, _ = finished_run
    requested = []
    restore_args = ocp.args.PyTreeRestore

    def spy(*args, **kwargs):
        requested.append(kwargs["item"])
        return restore_args(*args, **kwargs)

    def no_optimizer(*args, **kwargs):
        raise AssertionError("loading for inference built an optimizer")

    monkeypatch.setattr(ocp.args, "PyTreeRestore", spy)
    monkeypatch.setattr(nnx, "Optimizer", no_optimizer)
    live_bytes = lambda: sum(x.nbytes for x in jax.live_arrays())  # noqa: E731
    before = live_bytes()
    model, step = load_model(run_dir)
    grown = live_bytes() - before
    monkeypatch.undo()

    assert step == 8 and model.dropout.deterministic  # the latest checkpoint, in eval mode
    state = nnx.state(model)
    model_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    assert [list(item) for item in requested] == [[0]]  # of nnx.state((model, optimizer)): the model only
    assert jax.tree.structure(requested[0][0]) == jax.tree.structure(jax.tree.map(lambda x: 0, state))
    assert grown <= 1.05 * model_bytes
    param = jax.tree.leaves(nnx.state(model, nnx.Param))[0]
    assert dict(param.sharding.mesh.shape)["data"] == 8  # over the run's train.mesh (data:8), as in training
    loaded, trained = flat_by_name(state), flat_by_name(read_params(run_dir, 8)["0"])
    assert loaded.keys() == trained.keys() and len(loaded) > 10
    for name, value in trained.items():
        assert np.array_equal(loaded[name], value), name


def test_inference_loading_takes_a_mesh_and_falls_back_where_the_run_mesh_does_not_fit(finished_run):
    model, _ = load_model(finished_run[0], mesh=make_mesh("fsdp:-1"))
    assert model.embed_tokens.weight[...].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")  # embed split
    assert dict(inference_mesh("data:4").shape) == {"data": 1, "fsdp": 8, "tensor": 1, "expert": 1}  # 8 devices here
    assert dict(inference_mesh("data:-1").shape)["data"] == 8


def test_a_checkpoint_of_another_optimizer_state_is_a_one_line_error_and_still_loads_for_inference(
        corpus, tmp_path, monkeypatch):
    """A checkpoint written without the recorded grad_norm (jaxllm before it; here plain AdamW) cannot
    be continued: one line, not orbax's tree diff. Its model still loads for inference."""
    import grain
    import optax

    from jaxllm.train.loop import prepare_run_dir

    cfg = cfg_for(corpus, "train.max_steps=4")
    run_cfg, _, _ = prepare_run_dir(cfg, tmp_path)
    with monkeypatch.context() as patch:
        patch.setattr("jaxllm.train.loop.make_optimizer", lambda t: optax.chain(optax.clip_by_global_norm(1.0),
                                                                                  optax.adamw(1e-3)))
        mesh = make_mesh(cfg.train.mesh)
        with jax.set_mesh(mesh):
            old = Trainer(run_cfg, mesh)
    checkpointer = Checkpointer(tmp_path / "checkpoints", keep=1)
    checkpointer.save(2, old.state, iter(grain.MapDataset.range(4).to_iter_dataset()), {"step": 2, "stage": 0})
    checkpointer.close()
    with pytest.raises(DataError) as error:
        train(cfg, tmp_path, progress=False)
    message = str(error.value)
    assert "\n" not in message and "does not hold this config's model + optimizer state" in message
    assert "--run-dir" in message
    model, step = load_model(tmp_path)
    assert step == 2
    np.testing.assert_array_equal(np.asarray(model.embed_tokens.weight[...]),
                                  np.asarray(old.state[0]["embed_tokens"]["weight"][...]))


def test_loading_a_run_without_checkpoints_is_a_one_line_error(finished_run, tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_bytes((finished_run[0] / "config.yaml").read_bytes())
    (tmp_path / "run" / "tokenizer.json").write_bytes((finished_run[0] / "tokenizer.json").read_bytes())
    for make_empty_dir in (False, True):
        if make_empty_dir:
            (tmp_path / "run" / "checkpoints").mkdir()
        code, _, err = cli(["--run-dir", str(tmp_path / "run"), "--sample", "hi"], capsys)
        assert_one_line_error(code, err, "has no checkpoint")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoints", "config.yaml", "tokenizer.json"]


def test_curriculum_moves_to_the_next_stage_when_validation_perplexity_crosses_the_threshold(corpus, tmp_path):
    stages = "[{seq_len: 16, batch_size: 8, until_ppl: 1.0e9}, {seq_len: 32, batch_size: 16}]"
    cfg = cfg_for(corpus, "train.max_steps=4", "train.eval_every=2", "train.log_every=1", f"train.curriculum={stages}")
    train(cfg, tmp_path, progress=False)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    shapes = [(r["step"], r["seq_len"], r["batch_size"]) for r in records if "loss" in r]
    assert shapes == [(1, 16, 8), (2, 16, 8), (3, 32, 16), (4, 32, 16)]


# --- the CLI, as a user meets it ------------------------------------------------------------


def cli(argv, capsys):
    code = run("train", [*argv, "--no-progress"])
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line_error(code, err, *needles):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0]


@pytest.mark.parametrize("overrides, needles", [
    (["train.max_step=5"], ["unknown field 'train.max_step'", "max_steps"]),  # typo
    (["model.colour=1"], ["unknown field 'model.colour'"]),
    (["train.optimizer=sgd"], ["train.optimizer", "'adamw' | 'lion'"]),
    (["train.grad_accum=3"], ["train.grad_accum=3", "divisor of train.batch_size"]),
    (["train.mesh=data:3"], ["train.mesh='data:3'", "8"]),
    (["train.max_minutes=0"], ["train.max_minutes=0", "> 0 (or null"]),
    (["train.trainable=[final_norm, 'layer.*']"], ["train.trainable pattern 'layer.*' matches no parameter",
                                                  "layers.0."]),
    (["train.trainable=[]"], ["train.trainable", "non-empty list of glob patterns"]),
    (["model.lora.rank=4", "model.lora.targets=[layers.*.attn.x_proj]"],
     ["model.lora.targets pattern 'layers.*.attn.x_proj' matches no projection", "layers.0.attn.q_proj"]),
    (["model.lora.rank=-1"], ["model.lora.rank=-1", "an integer >= 0"]),
    (["model.dtype=float16", "train.loss_scale=0.5"], ["train.loss_scale=0.5", "'dynamic', a number >= 1"]),
])
def test_config_mistakes_are_one_line_errors_that_write_nothing(overrides, needles, corpus, tmp_path, capsys):
    code, _, err = cli(["--config", str(ROOT / "configs/tiny-gpt.yaml"), "--run-dir", str(tmp_path / "run"),
                        *SMALL, f"train.data={corpus}", *overrides], capsys)
    assert_one_line_error(code, err, *needles)
    assert not (tmp_path / "run").exists()


def test_bad_data_files_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1") * 10)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    cases = [("missing.txt", ["missing.txt", "no such file or directory"]),
             ("empty.txt", ["holds no text"]),
             ("latin1.txt", ["latin1.txt", "not UTF-8"]),
             ("bad.jsonl", ["bad.jsonl:2", "'text'"])]
    for name, needles in cases:
        code, _, err = cli(["--config", str(ROOT / "configs/tiny-gpt.yaml"), "--run-dir", str(tmp_path / f"run-{name}"),
                            *SMALL, f"train.data={tmp_path / name}"], capsys)
        assert_one_line_error(code, err, *needles)
        assert not (tmp_path / f"run-{name}" / "config.yaml").exists()


def test_incompatible_run_directory_is_refused_and_left_untouched(corpus, finished_run, tmp_path, capsys):
    run_dir = finished_run[0]
    base = ["--config", str(ROOT / "configs/tiny-gpt.yaml"), "--run-dir", str(run_dir), *SMALL,
            f"train.data={corpus}", *FINISHED]
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    code, _, err = cli([*base, "model.d_model=32"], capsys)
    assert_one_line_error(code, err, "model.d_model: 64 there, 32 now")
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    code, _, err = cli(["--config", str(ROOT / "configs/tiny-gpt.yaml"), "--run-dir", str(tmp_path / "new"), *SMALL,
                        f"train.data={corpus}", "--resume"], capsys)
    assert_one_line_error(code, err, "--resume", "no checkpoint")
    assert not (tmp_path / "new").exists()


def test_help_lists_every_option_and_train_field_with_its_default():
    result = subprocess.run([sys.executable, "scripts/train.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0
    for option in ("--config", "--run-dir", "--resume", "--platform", "--coordinator", "--debug"):
        assert option in result.stdout
    for name, default in TrainConfig.__dataclass_fields__.items():
        assert f"train.{name}" in result.stdout
    assert "train.max_steps" in result.stdout and " 1000 " in result.stdout


def test_train_step_applies_the_v3_router_bias_update():
    from jaxllm.model import lm_loss
    from jaxllm.model.moe import MoE, pop_expert_load

    gamma = 0.01
    cfg = load_config(ROOT / "configs/tiny-gpt.yaml", SMALL + [
        "train.max_steps=10", "model.mlp.kind=swiglu", "model.moe.n_routed_experts=4", "model.moe.num_experts_per_tok=2",
        "model.moe.router=sigmoid", f"model.moe.bias_update_rate={gamma}", "model.moe.moe_intermediate_size=32"])
    batch = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (8, 33), dtype=np.int32)
    mesh = make_mesh("data:1", jax.devices()[:1])
    with jax.set_mesh(mesh):
        trainer = Trainer(cfg, mesh)
        probe, _ = nnx.merge(trainer.graphdef, trainer.state)  # the step's forward, at the same parameters
        lm_loss(probe, batch[:, :-1], batch[:, 1:])
        loads = {path: np.asarray(v[...], np.float64) for path, v in nnx.to_flat_state(pop_expert_load(probe))}
        trainer.state, *_ = trainer.train_step(trainer.state, trainer.put(batch))
        model, _ = nnx.merge(trainer.graphdef, trainer.state)
    layers = {path: m for path, m in nnx.iter_graph(model) if isinstance(m, MoE)}
    assert layers and len(loads) == len(layers)
    for path, moe in layers.items():
        load = loads[(*path, "expert_load")]
        assert load.sum() == 8 * 32 * 2  # every token picked 2 experts in the step's forward
        expected = gamma * np.sign(load.mean() - load)  # from a zero bias: overloaded experts go down
        np.testing.assert_allclose(np.asarray(moe.expert_bias[...]), expected, atol=1e-7)
        assert np.any(expected != 0)


def test_the_train_command_samples_from_a_finished_run_directory(corpus, finished_run, capsys):
    run_dir, _ = finished_run
    argv = ["--run-dir", str(run_dir), "--sample", "the quick", "train.sample_tokens=40", "train.seed=3"]
    code, out, _ = cli(argv, capsys)
    assert code == 0
    header, text = out.split("\n", 1)
    assert header.startswith(f"--- sample from {run_dir} at step 8")
    text = text.rstrip("\n")
    assert text.startswith("the quick") and len(text) == len("the quick") + 40
    assert set(text) <= set(corpus.read_text(encoding="utf-8"))  # every sampled character is in the vocabulary
    assert cli(argv, capsys)[1] == out  # seeded: the same text again


def test_sampling_needs_a_run_directory(tmp_path, capsys):
    code, _, err = cli(["--run-dir", str(tmp_path), "--sample", "hi"], capsys)
    assert_one_line_error(code, err, "not a run directory")


def test_tidar_run_reserves_a_mask_id_the_tokenizer_never_produces(corpus, tmp_path):
    from jaxllm.train.loop import prepare_run_dir
    from jaxllm.model.diffusion import mask_token_id

    cfg = load_config(ROOT / "configs/tiny-tidar.yaml", [*SMALL, f"train.data={corpus}", "train.max_steps=2",
                                                          "train.warmup_steps=0", "train.log_every=1"])
    run_cfg, tokenizer, tokens = prepare_run_dir(cfg, tmp_path / "run")
    assert run_cfg.model.vocab_size == tokenizer.vocab_size + 1
    assert mask_token_id(run_cfg.model) == tokenizer.vocab_size
    assert int(np.max(tokens)) < tokenizer.vocab_size
    train(cfg, tmp_path / "run", progress=False)
    losses = [row["loss"] for row in map(json.loads, (tmp_path / "run/metrics.jsonl").read_text().splitlines())
              if "loss" in row]
    assert len(losses) == 2 and all(np.isfinite(losses))


def test_a_tidar_run_validates_its_drafter_too(corpus, tmp_path):
    """A TiDAR model's validation records the drafter's (diffusion) loss beside the AR loss, equal to
    torch_ref's diffusion loss on the same weights and batches; a plain model records no such key."""
    import torch

    from jaxllm.convert import to_state_dict
    from jaxllm.config import to_dict
    from torch_ref.model import Transformer as TorchTransformer

    cfg = load_config(ROOT / "configs/tiny-tidar.yaml", [*SMALL, "train.max_steps=3", "train.warmup_steps=0"])
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, cfg.model.vocab_size - 1, (8, 33), dtype=np.int32) for _ in range(2)]
    mesh = make_mesh("data:1", jax.devices()[:1])
    with jax.set_mesh(mesh):
        trainer = Trainer(cfg, mesh)
        for batch in batches:
            trainer.state, *_ = trainer.train_step(trainer.state, trainer.put(batch))
        losses = trainer.evaluate(batches)
        model = trainer.eval_model(trainer.state)
    reference = TorchTransformer(to_dict(cfg.model)).eval()
    reference.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in to_state_dict(model).items()})
    with torch.no_grad():
        parts = [reference.tidar_losses(*(torch.from_numpy(b).long() for b in (b[:, :-1], b[:, 1:]))) for b in batches]
    ar, diffusion = (float(np.mean([float(p[i]) for p in parts])) for i in (1, 2))
    assert set(losses) == {"val_loss", "val_diffusion_loss"}
    np.testing.assert_allclose(losses["val_loss"], ar, rtol=1e-5)
    np.testing.assert_allclose(losses["val_diffusion_loss"], diffusion, rtol=1e-5)
    assert abs(ar - diffusion) > 1e-3  # the two are different quantities

    run_cfg = load_config(ROOT / "configs/tiny-tidar.yaml", [*SMALL, f"train.data={corpus}", "train.max_steps=2",
                                                             "train.eval_every=2", "train.warmup_steps=0"])
    train(run_cfg, tmp_path / "run", progress=False)
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if np.isfinite(r.get("val_diffusion_loss", np.nan))] == [2]
    with jax.set_mesh(mesh):
        plain = Trainer(cfg_for(corpus), mesh)
        assert set(plain.evaluate(batches[:1])) == {"val_loss"}


def test_the_sample_command_reads_a_run_directory(finished_run, capsys):
    run_dir, _ = finished_run
    argv = ["--run", str(run_dir), "--prompt", "the quick", "--temperature", "0", "--max-new-tokens", "10", "--no-stream"]
    assert run("sample", argv) == 0
    out, err = capsys.readouterr()
    assert "note:" not in err  # 9 + 10 tokens: inside the trained length
    assert out.startswith("the quick") and out.endswith("\n") and len(out) - 1 == len("the quick") + 10
    assert run("sample", [*argv, "--engine", "torch"]) == 0  # torch_ref on the run's weights: the same greedy text
    assert capsys.readouterr().out == out
    step = max((p.name for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()), key=int)
    assert run("sample", ["--checkpoint", str(run_dir / "checkpoints" / step), *argv[2:]]) == 0  # a step directory
    assert capsys.readouterr().out == out
    assert run("sample", [*argv[:-3], "--max-new-tokens", "24", "--no-stream"]) == 0  # 9 + 24 > 32 trained
    assert "past the 32-token sequences this model was trained on" in capsys.readouterr().err
    code = run("sample", [*argv, "--step", "5"])
    assert_one_line_error(code, capsys.readouterr().err, "no checkpoint at step 5", "it has steps")


def test_overrides_may_come_before_and_after_options(tmp_path, capsys):
    argv = ["--config", str(ROOT / "configs/tiny-gpt.yaml"), "model.n_layer=2", "--run-dir", str(tmp_path / "r"),
            "--no-progress", "model.d_model=-3"]
    assert run("train", argv) == 2
    err = capsys.readouterr().err
    assert "model.d_model=-3" in err and "unrecognized" not in err  # both overrides were read; the bad one named
    assert not (tmp_path / "r").exists()


def test_a_checkpoint_that_lacks_part_of_the_model_is_a_one_line_error(finished_run, tmp_path):
    """orbax's partial restore leaves what the checkpoint lacks abstract; load_model names it instead
    (here a config that gained an LM-head bias the run never trained)."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(finished_run[0], run_dir)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    saved["model"]["lm_head_bias"] = True
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(DataError, match=r"lacks the model's lm_head_bias \(1 missing in all\)") as error:
        load_model(run_dir)
    assert "\n" not in str(error.value)


def test_trainable_patterns_freeze_the_rest_with_no_optimizer_state():
    """train.trainable: the parameters it does not match are bit-identical after training and have
    no AdamW moments (the optimizer state shrinks by exactly their share); the matched ones train."""
    overrides = SMALL + ["model.n_layer=2", "model.vocab_size=64"]
    patterns = "train.trainable=['layers.1.mlp.*', final_norm]"
    frozen = Trainer(load_config(ROOT / "configs/tiny-gpt.yaml", overrides + [patterns]), make_mesh("data:8"))
    full = Trainer(load_config(ROOT / "configs/tiny-gpt.yaml", overrides), make_mesh("data:8"))
    before = flat_by_name(frozen.state[0])
    batch = np.random.default_rng(0).integers(0, 64, (8, 33)).astype(np.int32)
    for _ in range(3):
        frozen.state, *_ = frozen.train_step(frozen.state, frozen.put(batch))
    after = flat_by_name(frozen.state[0])
    trains = lambda name: name.startswith("layers/1/mlp/") or name.startswith("final_norm/")  # noqa: E731
    params = [n for n in before if before[n].dtype.kind == "f"]
    assert any(trains(n) for n in params) and any(not trains(n) for n in params)
    for name in params:
        changed = not np.array_equal(before[name], after[name])
        assert changed == trains(name), name
    moments = lambda trainer: sum(x.nbytes for x in jax.tree.leaves(trainer.state[1]) if x.ndim > 0)  # noqa: E731
    trainable_bytes = sum(before[n].nbytes for n in params if trains(n))
    all_bytes = sum(before[n].nbytes for n in params)
    assert moments(frozen) == 2 * trainable_bytes and moments(full) == 2 * all_bytes  # AdamW: mu and nu


def test_float16_gradients_underflow_without_loss_scaling_and_train_with_it():
    """With small weights (init_std 0.002) a float16 backward pass rounds many gradient entries to
    zero: without loss scaling those weights never move (AdamW without decay moves a weight only
    when its gradient is nonzero); with train.loss_scale=dynamic (jmp) almost all of them move, the
    loss falls as a float32 run's does."""
    overrides = SMALL + ["model.n_layer=2", "model.vocab_size=256", "model.init_std=0.002", "train.weight_decay=0",
                         "model.max_seq_len=64", "train.seq_len=64", "train.batch_size=64", "train.lr=1e-3"]
    batch = np.random.default_rng(0).integers(0, 256, (64, 65)).astype(np.int32)

    def run(*extra):
        trainer = Trainer(load_config(ROOT / "configs/tiny-gpt.yaml", overrides + list(extra)), make_mesh("data:8"))
        before = flat_by_name(trainer.state[0])
        losses = []
        for _ in range(4):
            trainer.state, loss, _, skipped = trainer.train_step(trainer.state, trainer.put(batch))
            losses.append(float(loss))
        after = flat_by_name(trainer.state[0])
        names = [n for n in before if before[n].dtype.kind == "f" and before[n].ndim >= 2]
        still = sum(int(np.sum(before[n] == after[n])) for n in names) / sum(before[n].size for n in names)
        return still, losses, after, int(np.asarray(skipped)[1])

    fp32_still, fp32_losses, fp32_after, _ = run()
    unscaled_still, _, _, _ = run("model.dtype=float16")
    scaled_still, scaled_losses, scaled_after, skipped = run("model.dtype=float16", "train.loss_scale=dynamic")
    assert fp32_still < 0.001
    assert unscaled_still > 0.05  # underflowed gradients: frozen weights
    assert scaled_still < 0.01 and skipped == 0
    assert scaled_losses[-1] < scaled_losses[0] - 0.01
    np.testing.assert_allclose(scaled_losses, fp32_losses, atol=1e-2)  # the float32 run's curve
