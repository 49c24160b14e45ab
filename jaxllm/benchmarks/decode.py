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

from jaxllm.cli import ArgumentParser


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
    from jaxllm.train.tokenizer import load_tokenizer

    if args.run is None:
        raise ConfigError("--prompt-text needs --run (its tokenizer encodes the text)")
    path = Path(args.prompt_text)
    if not path.is_file():
        raise DataError(f"--prompt-text {str(path)!r} does not exist")
    ids = np.asarray(load_tokenizer(Path(args.run) / "tokenizer.json").encode(path.read_text(encoding="utf-8")))
    if len(ids) <= args.prompt_tokens:
        raise DataError(f"--prompt-text {str(path)!r} is {len(ids)} tokens; --prompt-tokens needs more than {args.prompt_tokens}")
    return ids


def run(argv: list[str]) -> int:
    parser = ArgumentParser(prog="bench.py decode", description=__doc__)
    parser.add_argument("--config", default="configs/tiny-llama.yaml", help="preset YAML (default: configs/tiny-llama.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model.n_layer=4")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="compute dtype (default: the config's)")
    parser.add_argument("--batch", default="1,32", help="comma-separated batch sizes (default: 1,32)")
    for flag, default, what in (("--prompt-tokens", 128, "prompt length"), ("--new", 256, "new tokens per row"),
                                ("--runs", 3, "timed runs; the median is reported")):
        parser.add_argument(flag, type=int, default=default, help=f"{what} (default: {default})")
    parser.add_argument("--run", default=None, metavar="DIR", help="trained weights: a run directory (default: random)")
    parser.add_argument("--prompt-text", default=None, metavar="FILE",
                        help="with --run: prompts are slices of this text, encoded with the run's tokenizer")
    parser.add_argument("--speculative", choices=["tidar"], default=None, help="also time TiDAR decoding")
    parser.add_argument("--block", default="8", help="with --speculative: comma-separated draft lengths (default: 8)")
    parser.add_argument("--beta", type=float, default=1.0, help="with --speculative: TiDAR's beta (default: 1)")
    parser.add_argument("--no-torch", action="store_true", help="skip torch_ref")
    parser.add_argument("--no-hf", action="store_true", help="skip Hugging Face generate")
    args = parser.parse_intermixed_args(argv)

    import jax
    from flax import nnx

    from jaxllm.config import load_config, to_dict
    from jaxllm.errors import ConfigError
    from jaxllm.convert import to_state_dict
    from jaxllm.model import Transformer

    overrides = list(args.overrides) + ([f"model.dtype={args.dtype}"] if args.dtype else [])
    if args.run is not None:
        args.config = str(Path(args.run) / "config.yaml")
    cfg = load_config(args.config, overrides).model
    try:
        batches = [int(b) for b in args.batch.split(",")]
    except ValueError:
        raise ConfigError(f"--batch is {args.batch!r}; allowed: comma-separated integers such as 1,32") from None
    need = args.prompt_tokens + args.new
    if need > cfg.max_seq_len and cfg.position.kind != "learned":  # rope: the context is only a declared limit
        overrides.append(f"model.max_seq_len={need}")
        cfg = load_config(args.config, overrides).model
    if need > cfg.max_seq_len:
        raise ConfigError(f"--prompt-tokens + --new is {args.prompt_tokens + args.new}; the context holds "
                          f"{cfg.max_seq_len} (model.max_seq_len)")
    if args.run is None:
        model = Transformer(cfg, rngs=nnx.Rngs(0))
    else:
        from jaxllm.checkpoint import load_model

        if overrides:
            raise ConfigError("--run uses the run's own config; drop the overrides and --dtype")
        model, _ = load_model(Path(args.run))
    state_dict = to_state_dict(model)
    try:
        blocks = [int(b) for b in args.block.split(",")]
    except ValueError:
        raise ConfigError(f"--block is {args.block!r}; allowed: comma-separated integers such as 4,8,16") from None
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}, python {platform.python_version()}")
    print(f"config: {args.config} {' '.join(overrides)}; dtype {cfg.dtype}; prompt {args.prompt_tokens}, "
          f"{args.new} new tokens, greedy; median of {args.runs} runs")
    implementations = [("jaxllm (jit while_loop, KV cache)", lambda p: jax_rows(model, p, args.new, args.runs))]
    notes, tidar_stats = [], {}  # implementation name -> the DecodeStats of its runs
    if args.speculative is not None:
        from jaxllm.decode import TiDAR

        for block in blocks:
            spec = TiDAR(block, args.beta).validate(cfg)
            name = f"jaxllm TiDAR block {block}, beta {args.beta:g}"
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
    text_ids = prompt_ids(args, cfg)
    print(f"{'implementation':40s} {'batch':>5s} {'ms/token':>9s} {'tokens/s':>10s}  same tokens as jaxllm")
    for batch in batches:
        if text_ids is None:
            vocab = cfg.vocab_size - (1 if cfg.diffusion.enabled else 0)  # never TiDAR's [MASK]
            prompts = rng.integers(0, vocab, (batch, args.prompt_tokens), dtype=np.int32)
        else:
            starts = rng.integers(0, len(text_ids) - args.prompt_tokens, batch)
            prompts = np.stack([text_ids[s:s + args.prompt_tokens] for s in starts]).astype(np.int32)
        reference = None
        for name, fn in implementations:
            try:
                seconds, tokens = fn(prompts)
            except Exception as e:  # a peer that fails is reported, not fatal
                print(f"{name:40s} {batch:5d} failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}")
                continue
            reference = tokens if reference is None else reference
            same = "-" if tokens is reference else ("yes" if tokens == reference else "no")
            extra = ""
            if name in tidar_stats:
                st = tidar_stats[name][-1]
                extra = f"  {st.tokens_per_forward:.2f} tokens/forward, {100 * st.acceptance_rate:.0f}% accepted"
            print(f"{name:40s} {batch:5d} {1000 * seconds / args.new:9.2f} {batch * args.new / seconds:10,.0f}  {same}{extra}")
    for note in notes:
        print(note)
    if args.speculative is not None and args.beta != 1.0:
        print("note: with beta < 1 TiDAR's tokens are not the AR model's: 'same tokens' is not expected")
    if cfg.dtype != "float32":
        print("note: in bfloat16 greedy tokens may differ between implementations (rounding), not a bug")
    return 0
