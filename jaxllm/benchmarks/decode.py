"""Decode benchmark: greedy generation of --new tokens after a --prompt-token prompt, at each
--batch, for jaxllm (KV cache, one jitted prefill + while_loop), torch_ref (eager, same caches) and
Hugging Face `generate` with a static cache where the config maps onto LlamaForCausalLM (or
MistralForCausalLM with a sliding window), all on the same weights and machine.

ms/token is the wall time of one whole generation (prefill included) divided by the new tokens;
tokens/s counts the new tokens of every row. Compilation and a warm-up run are excluded; the
median of --runs timed runs is reported. EOS is off so every run makes exactly --new tokens.

Weights are random (seed 0) unless --run names a training run (its latest checkpoint); prompts
are random token ids unless --prompt-text gives a text file whose slices (encoded with the run's
tokenizer) become the prompts. `--speculative tidar` adds jaxllm's TiDAR self-speculative
decoding of the same weights (--block, --beta), with its tokens per forward; with beta = 1 its
tokens must equal plain greedy decoding's.
"""
from __future__ import annotations

import platform
import time
from pathlib import Path

import numpy as np

from jaxllm.benchmarks import failure
from jaxllm.cli import ArgumentParser, positive_int, positive_ints


def _median_seconds(fn, runs: int) -> float:
    fn()  # compilation / warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def jax_rows(model, prompts: np.ndarray, new: int, runs: int, speculative=None, stats: list | None = None):
    from jaxllm.decode import generate

    prompts = prompts.tolist()
    out = []
    seconds = _median_seconds(lambda: out.append(generate(model, prompts, max_new_tokens=new, speculative=speculative,
                                                          return_stats=True)), runs)
    tokens, run_stats = out[-1]
    if stats is not None:
        stats.append(run_stats)
    return seconds, tokens


def torch_rows(model, prompts: np.ndarray, new: int, runs: int, dtype):
    from torch_ref.generate import generate

    prompts = prompts.tolist()
    out = []
    seconds = _median_seconds(lambda: out.append(generate(model, prompts, new, cache_dtype=dtype)), runs)
    return seconds, out[-1]


def hf_model(cfg, state_dict: dict, device: str, dtype):
    """A transformers Llama (or Mistral, with a sliding window) holding the same weights, or the reason
    why not. Its config and tensor names are what `save_hf` writes: the llama / mistral specs of
    `jaxllm.convert.hf`."""
    import torch

    a = cfg.attention
    if cfg.position.kind != "rope" or cfg.norm.kind != "rmsnorm" or cfg.mlp.kind != "swiglu" or a.kind != "mha":
        return None, "not Llama-shaped (needs rope, rmsnorm, swiglu, mha attention)"
    if a.qkv_bias or a.out_bias or cfg.mlp.bias or cfg.lm_head_bias or cfg.moe.n_routed_experts or cfg.rezero:
        return None, "not Llama-shaped (biases, MoE or ReZero)"
    import transformers

    from jaxllm.convert.hf import check_exportable, hf_config, to_hf_tensors
    from jaxllm.errors import ConversionError

    family = "llama" if a.window is None else "mistral"
    try:
        check_exportable(cfg, family)
    except ConversionError as e:
        return None, str(e)
    config = hf_config(cfg, family)
    model = getattr(transformers, config["architectures"][0])(transformers.AutoConfig.for_model(**config))
    hf_state = {name: torch.from_numpy(value) for name, value in to_hf_tensors(state_dict, family).items()}
    if cfg.tie_embeddings:
        hf_state["lm_head.weight"] = hf_state["model.embed_tokens.weight"]
    model.load_state_dict(hf_state, strict=True)
    return model.to(device=device, dtype=dtype).eval(), None


def hf_rows(model, prompts: np.ndarray, new: int, runs: int, device: str):
    import torch

    ids = torch.from_numpy(prompts).long().to(device)
    out = []

    def run():
        with torch.no_grad():
            out.append(model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                                      do_sample=False, cache_implementation="static", pad_token_id=0))

    seconds = _median_seconds(run, runs)
    return seconds, out[-1][:, prompts.shape[1]:].tolist()


def prompt_ids(args, cfg) -> np.ndarray | None:
    """The --prompt-text file encoded with the run's tokenizer, or None (random prompts)."""
    if args.prompt_text is None:
        return None
    from jaxllm.errors import ConfigError, DataError
    from jaxllm.files import read_text
    from jaxllm.train.tokenizer import load_tokenizer

    if args.run is None:
        raise ConfigError("--prompt-text needs --run (its tokenizer encodes the text)")
    path = Path(args.prompt_text)
    ids = np.asarray(load_tokenizer(Path(args.run) / "tokenizer.json").encode(read_text(path, "--prompt-text")))
    if len(ids) <= args.prompt_tokens:
        raise DataError(f"--prompt-text {str(path)!r} is {len(ids)} tokens; --prompt-tokens needs more than {args.prompt_tokens}")
    return ids


def decode_bytes(cfg, batch: int, prompt_tokens: int, new: int) -> int:
    """Bytes one jaxllm generation of `batch` rows allocates beside the weights: the KV cache
    (`init_cache` at the padded lengths `generate` uses; its shapes from jax.eval_shape, nothing is
    allocated) and the output buffer."""
    import jax

    from jaxllm.decode import bucket
    from jaxllm.model.transformer import abstract_model

    model = abstract_model(cfg)
    cache = jax.eval_shape(lambda: model.init_cache(batch, bucket(prompt_tokens) + bucket(new)))
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache)) + 4 * batch * bucket(new)


def memory_bytes(device) -> int | None:
    """The device's memory (an accelerator's bytes_limit; the host's RAM for a CPU), or None if unknown."""
    import os

    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(cfg, batch: int, prompt_tokens: int, new: int, device) -> None:
    """A one-line ConfigError when the largest batch's KV cache and output cannot fit the device."""
    from jaxllm.errors import ConfigError

    need, have = decode_bytes(cfg, batch, prompt_tokens, new), memory_bytes(device)
    if have is not None and need > have:
        raise ConfigError(f"--batch {batch} x (--prompt-tokens {prompt_tokens} + --new {new}) needs "
                          f"{need / 2**30:,.1f} GiB for the KV cache and output, more than the {have / 2**30:,.1f} "
                          f"GiB of {device.device_kind}; lower --batch, --prompt-tokens or --new")


def profile(model, prompts: np.ndarray, new: int, directory: Path, untraced: float | None) -> None:
    """One more (compiled, warm) jaxllm generation under jax.profiler: its trace's path and summary
    (jaxllm.benchmarks.profile), per new token: how many XLA ops ran and how busy each lane was,
    against the `untraced` seconds of the timed runs (tracing slows the host down)."""
    from jaxllm.benchmarks.profile import report, summarize, trace
    from jaxllm.decode import generate

    try:
        seconds, path = trace(lambda: generate(model, prompts.tolist(), max_new_tokens=new), directory)
    except Exception as e:  # a profiler that fails is reported, not fatal
        print(f"profile at batch {len(prompts)}: {failure(e)}")
        return
    print(f"profile at batch {len(prompts)} (the decode loop's module, jit__run): {path}")
    for line in report(summarize(path, module="jit__run"), seconds, new, untraced=untraced):
        print(line)


def run(argv: list[str]) -> int:
    parser = ArgumentParser(prog="bench.py decode", description=__doc__)
    parser.add_argument("--config", default="configs/tiny-llama.yaml", help="preset YAML (default: configs/tiny-llama.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model.n_layer=4")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="compute dtype (default: the config's)")
    parser.add_argument("--batch", type=positive_ints, default=[1, 32],
                        help="comma-separated batch sizes (default: 1,32)")
    for flag, default, what in (("--prompt-tokens", 128, "prompt length"), ("--new", 256, "new tokens per row"),
                                ("--runs", 3, "timed runs; the median is reported")):
        parser.add_argument(flag, type=positive_int, default=default, help=f"{what} (default: {default})")
    parser.add_argument("--run", default=None, metavar="DIR", help="trained weights: a run directory (default: random)")
    parser.add_argument("--step", type=int, default=None, help="with --run: the checkpoint step (default: the latest)")
    parser.add_argument("--prompt-text", default=None, metavar="FILE",
                        help="with --run: prompts are slices of this text, encoded with the run's tokenizer")
    parser.add_argument("--speculative", choices=["tidar"], default=None, help="also time TiDAR decoding")
    parser.add_argument("--block", type=positive_ints, default=[8],
                        help="with --speculative: comma-separated draft lengths (default: 8)")
    parser.add_argument("--beta", type=float, default=1.0, help="with --speculative: TiDAR's beta (default: 1)")
    parser.add_argument("--no-torch", action="store_true", help="skip torch_ref")
    parser.add_argument("--no-hf", action="store_true", help="skip Hugging Face generate")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="also trace one more jaxllm generation at each batch with jax.profiler (under DIR) "
                             "and print its XLA ops and device busy time a token")
    args = parser.parse_intermixed_args(argv)

    import jax
    from flax import nnx

    from jaxllm.config import load_config, to_dict
    from jaxllm.errors import ConfigError
    from jaxllm.convert import to_state_dict
    from jaxllm.decode import MAX_NEW_TOKENS
    from jaxllm.model import Transformer

    overrides = list(args.overrides) + ([f"model.dtype={args.dtype}"] if args.dtype else [])
    if args.step is not None and args.run is None:
        raise ConfigError("--step goes with --run (the run whose checkpoint to load)")
    if args.run is not None:
        if overrides:
            raise ConfigError("--run uses the run's own config; drop the overrides and --dtype")
        args.config = str(Path(args.run) / "config.yaml")
    cfg = load_config(args.config, overrides).model
    batches, blocks = args.batch, args.block
    need = args.prompt_tokens + args.new
    if args.new > MAX_NEW_TOKENS:
        raise ConfigError(f"--new {args.new} is invalid; allowed: 1..{MAX_NEW_TOKENS} (decode lengths are int32)")
    if need > cfg.max_seq_len and cfg.position.kind != "learned" and args.run is None:
        overrides.append(f"model.max_seq_len={need}")  # rope: the context is only a declared limit
        cfg = load_config(args.config, overrides).model
    if need > cfg.max_seq_len:
        raise ConfigError(f"--prompt-tokens + --new is {need}; the context holds {cfg.max_seq_len} "
                          f"(model.max_seq_len{' of the run' if args.run is not None else ''})")
    check_memory(cfg, max(batches), args.prompt_tokens, args.new, jax.devices()[0])
    if args.speculative is not None:
        from jaxllm.decode import TiDAR

        specs = [TiDAR(block, args.beta).validate(cfg) for block in blocks]  # mistakes fail before any work
    text_ids = prompt_ids(args, cfg)
    if args.run is None:
        model = Transformer(cfg, rngs=nnx.Rngs(0))
    else:
        from jaxllm.checkpoint import load_model

        model, _ = load_model(Path(args.run), args.step)
    state_dict = to_state_dict(model)
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}, python {platform.python_version()}")
    print(f"config: {args.config} {' '.join(overrides)}; dtype {cfg.dtype}; prompt {args.prompt_tokens}, "
          f"{args.new} new tokens, greedy; median of {args.runs} runs")
    implementations = [("jaxllm (jit while_loop, KV cache)", lambda p: jax_rows(model, p, args.new, args.runs))]
    notes, tidar_stats = [], {}  # implementation name -> the DecodeStats of its runs
    if args.speculative is not None:
        for spec in specs:
            name = f"jaxllm TiDAR block {spec.block}, beta {args.beta:g}"
            tidar_stats[name] = []
            implementations.append((name, lambda p, spec=spec, name=name: jax_rows(
                model, p, args.new, args.runs, spec, tidar_stats[name])))
    if not args.no_torch or not args.no_hf:
        import torch

        from torch_ref.model import Transformer as TorchTransformer

        torch_device = "cuda" if torch.cuda.is_available() else "cpu"
        torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(cfg.dtype, torch.float32)
        if not args.no_torch:
            torch_model = TorchTransformer(to_dict(cfg))
            torch_model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in state_dict.items()})
            torch_model = torch_model.to(device=torch_device, dtype=torch_dtype).eval()
            implementations.append((f"torch_ref eager (torch {torch.__version__})",
                                    lambda p: torch_rows(torch_model, p, args.new, args.runs, torch_dtype)))
        if not args.no_hf:
            import transformers

            hf, why = hf_model(cfg, state_dict, torch_device, torch_dtype)
            if hf is None:
                notes.append(f"Hugging Face generate skipped: {why}")
            else:
                implementations.append((f"HF generate, static cache ({transformers.__version__})",
                                        lambda p: hf_rows(hf, p, args.new, args.runs, torch_device)))
    rng = np.random.default_rng(0)
    print(f"{'implementation':40s} {'batch':>5s} {'ms/token':>9s} {'tokens/s':>10s}  same tokens as jaxllm")
    for batch in batches:
        if text_ids is None:
            vocab = cfg.vocab_size - (1 if cfg.diffusion.enabled else 0)  # never TiDAR's [MASK]
            prompts = rng.integers(0, vocab, (batch, args.prompt_tokens), dtype=np.int32)
        else:
            starts = rng.integers(0, len(text_ids) - args.prompt_tokens, batch)
            prompts = np.stack([text_ids[s:s + args.prompt_tokens] for s in starts]).astype(np.int32)
        reference, plain_seconds = None, None
        for name, fn in implementations:
            try:
                seconds, tokens = fn(prompts)
            except Exception as e:  # a peer that fails is reported, not fatal
                print(f"{name:40s} {batch:5d} {failure(e)}")
                continue
            if name == implementations[0][0]:  # jaxllm's plain decoding: what --profile compares with
                plain_seconds = seconds
            reference = tokens if reference is None else reference
            same = "-" if tokens is reference else ("yes" if tokens == reference else "no")
            extra = ""
            if name in tidar_stats:
                st = tidar_stats[name][-1]
                extra = f"  {st.tokens_per_forward:.2f} tokens/forward, {100 * st.acceptance_rate:.0f}% accepted"
            print(f"{name:40s} {batch:5d} {1000 * seconds / args.new:9.2f} {batch * args.new / seconds:10,.0f}  {same}{extra}")
        if args.profile is not None:
            profile(model, prompts, args.new, Path(args.profile) / f"batch{batch}", plain_seconds)
    for note in notes:
        print(note)
    if args.speculative is not None and args.beta != 1.0:
        print("note: with beta < 1 TiDAR's tokens are not the AR model's: 'same tokens' is not expected")
    if cfg.dtype != "float32":
        print("note: in bfloat16 greedy tokens may differ between implementations (rounding), not a bug")
    return 0
