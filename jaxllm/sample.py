"""`jaxllm sample` / `python scripts/sample.py`: generate text from a trained run or a weights file.

    python scripts/sample.py --run runs/seed003-char-gpt --prompt "ROMEO:" --max-new-tokens 200
    python scripts/sample.py --checkpoint model.safetensors --tokenizer tokenizer.json \\
        --prompt-file prompts.txt --temperature 0.8 --top-p 0.95
    python scripts/sample.py --run runs/seed003-char-gpt --interactive

--run loads the model of the latest (or --step) orbax checkpoint of a training run directory (its
parameters only, sharded over the run's train.mesh as in training), with the run's config and
tokenizer (--checkpoint RUN/checkpoints/N names one step the same way); --checkpoint FILE loads
torch_ref weights as safetensors (the config from the file's metadata, or --config; the tokenizer
from --tokenizer or tokenizer.json beside the file).
A single prompt streams to stdout as it is generated; a prompt file (one prompt per line) is
decoded as one batch. --interactive opens a prompt loop whose /commands change the settings
between prompts (type /help there). --engine torch decodes with torch_ref instead (same caches
and sampling rules; its random draws differ from JAX's, greedy output is the same).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from jaxllm.cli import ArgumentParser, nonnegative_int
from jaxllm.errors import DataError, DecodeError


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="sample.py", description=__doc__.split("\n\n")[0],
                       epilog="\n".join(__doc__.split("\n")[2:]), formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", metavar="DIR", help="a training run directory (config.yaml, tokenizer.json, checkpoints/)")
    source.add_argument("--checkpoint", metavar="PATH",
                        help="a safetensors weights file (torch_ref layout) or a run's checkpoint step, RUN/checkpoints/N")
    p.add_argument("--step", type=nonnegative_int, default=None,
                   help="with --run: the checkpoint step (default: the latest)")
    p.add_argument("--config", default=None, help="with --checkpoint: preset YAML when the file has no config (default: the file's)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the run's, or the one beside --checkpoint)")
    prompts = p.add_mutually_exclusive_group()
    prompts.add_argument("--prompt", default=None, help="the prompt text (a literal \\n is a newline)")
    prompts.add_argument("--prompt-file", default=None,
                         help="a file of prompts, one per line (a literal \\n is a newline), decoded as one batch")
    prompts.add_argument("--interactive", action="store_true", help="a prompt loop; /help lists its commands")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate at most (default: 200)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy (default: 0.8)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0: off (default: 0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus: smallest set with mass >= p; 1: off (default: 1)")
    p.add_argument("--min-p", type=float, default=0.0, help="keep p >= min_p * the top p; 0: off (default: 0)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="Hugging Face's; 1: off (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same text (default: 0)")
    p.add_argument("--stop", action="append", default=[], help="stop after this string (repeatable; default: none)")
    p.add_argument("--eos-id", type=int, default=None,
                   help="stop at this token id (default: the tokenizer's <|endoftext|> if it has one)")
    p.add_argument("--no-stream", action="store_true", help="print the text at the end, not token by token")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole context every token (the reference path)")
    p.add_argument("--speculative", choices=["tidar"], default=None,
                   help="self-speculative decoding with a TiDAR model's diffusion drafts (default: off)")
    p.add_argument("--block", type=int, default=None,
                   help="with --speculative: tokens drafted per forward (default: the model's diffusion.block_size)")
    p.add_argument("--beta", type=float, default=None,
                   help="with --speculative: trust in the AR logits over the drafts' when verifying; "
                        "1 gives exactly the AR model's tokens (default: 1)")
    p.add_argument("--engine", choices=["jax", "torch"], default="jax", help="jaxllm or torch_ref (default: jax)")
    p.add_argument("--platform", choices=["cpu", "cuda", "tpu", "metal"], default=None,
                   help="JAX backend (default: JAX_PLATFORMS or jax's choice)")
    p.add_argument("--debug", action="store_true", help="show tracebacks of user errors (default: off)")
    return p


# ---------------------------------------------------------------------------------------------
# Loading


@dataclasses.dataclass
class Loaded:
    cfg: object  # the model section
    tokenizer: object
    model: object  # a jaxllm Transformer or a torch_ref Transformer
    engine: str
    trained_len: int | None = None  # the longest training sequence, when the weights come from a run


MAX_SEED = 2**63 - 1  # jax.random.key takes an int64


def check_settings(settings: "Settings") -> None:
    """One-line DecodeErrors for settings no model can use (those that need the model, such as
    --eos-id and --block, are checked once it is loaded)."""
    from jaxllm.decode import Sampling, check_max_new_tokens

    Sampling(settings.temperature, settings.top_k, settings.top_p, settings.min_p,
             settings.repetition_penalty).validate()
    check_max_new_tokens(settings.max_new_tokens)
    if not 0 <= settings.seed <= MAX_SEED:
        raise DecodeError(f"seed is {settings.seed}; allowed: an integer in 0..{MAX_SEED} (2**63 - 1)")


def _tokenizer(path: Path):
    from jaxllm.train.tokenizer import load_tokenizer

    if not path.is_file():
        raise DataError(f"tokenizer file {str(path)!r} does not exist; give one with --tokenizer")
    return load_tokenizer(path)


def load(args) -> Loaded:
    from jaxllm.config import config_from_dict, load_config, to_dict

    if args.checkpoint is not None and Path(args.checkpoint).is_dir():  # a run's orbax step: run/checkpoints/N
        step_dir = Path(args.checkpoint)
        if step_dir.parent.name != "checkpoints" or not step_dir.name.isdigit():
            raise DataError(f"{str(step_dir)!r} is a directory but not a checkpoint step (RUN/checkpoints/N); "
                            f"give a safetensors file, a step directory or --run")
        args.run, args.step, args.checkpoint = str(step_dir.parent.parent), int(step_dir.name), None
    if args.run is not None:
        from jaxllm.checkpoint import load_model

        run_dir = Path(args.run)
        model = load_model(run_dir, args.step)[0]  # the parameters only, sharded like training
        tokenizer = _tokenizer(Path(args.tokenizer) if args.tokenizer else run_dir / "tokenizer.json")
        cfg, state_dict = model.cfg, None
        trained = load_config(run_dir / "config.yaml").train
        trained_len = max([trained.seq_len, *(stage.seq_len for stage in trained.curriculum or [])])
    else:
        from jaxllm.convert import load_safetensors, model_from_state_dict

        path = Path(args.checkpoint)
        state_dict, saved = load_safetensors(path)  # a missing or unreadable file is one line
        if args.config is not None:
            cfg = load_config(args.config).model
        elif saved is not None:
            cfg = config_from_dict({"model": saved}).model
        else:
            raise DataError(f"weights file {str(path)!r} holds no config; give the preset with --config")
        tokenizer = _tokenizer(Path(args.tokenizer) if args.tokenizer else path.parent / "tokenizer.json")
        model = None
        if args.engine == "jax":
            model = model_from_state_dict(state_dict, cfg)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise DataError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {cfg.vocab_size}; "
                        f"give the tokenizer the model was trained with")
    if args.engine == "torch":
        import torch

        from jaxllm.convert import to_state_dict
        from torch_ref.model import Transformer as TorchTransformer

        if state_dict is None:
            state_dict = to_state_dict(model)
        torch_model = TorchTransformer(to_dict(cfg))
        torch_model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in state_dict.items()})
        model = torch_model.eval()
    else:
        model.eval()
    return Loaded(cfg, tokenizer, model, args.engine, trained_len if args.run is not None else None)


# ---------------------------------------------------------------------------------------------
# Decoding text


def encode_prompt(tokenizer, text: str, index: int = 0) -> list[int]:
    """Token ids of a prompt; characters a character-level vocabulary lacks are an error."""
    from jaxllm.train.tokenizer import UNK, CharTokenizer

    if isinstance(tokenizer, CharTokenizer):
        known = set(tokenizer.chars) - {UNK}
        unknown = sorted({c for c in text if c not in known})
        if unknown:
            shown = "".join(unknown[:10])
            raise DecodeError(f"prompt {index} has characters outside the vocabulary: {shown!r}; "
                              f"allowed: the {len(known)} characters of the training corpus")
    return [int(i) for i in tokenizer.encode(text)]


def eos_of(tokenizer, eos_id: int | None) -> int | None:
    return eos_id if eos_id is not None else getattr(tokenizer, "eot_id", None)


class StreamPrinter:
    """Prints row 0's new text as tokens arrive (decoding the whole output each time, so multi-byte
    BPE pieces appear once complete) and stops printing at a stop string."""

    def __init__(self, tokenizer, stops: list[str], out=None):
        self.tokenizer, self.stops, self.out = tokenizer, stops, out or sys.stdout
        self.ids: list[int] = []
        self.printed = 0
        self.active = True

    def __call__(self, tokens, active) -> None:
        if not self.active or not active[0]:
            return
        self.ids.append(int(tokens[0]))
        text = truncate_at_stop(self.tokenizer.decode(self.ids), self.stops)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return
        self.out.write(text[self.printed:])
        self.out.flush()
        self.printed = len(text)


def truncate_at_stop(text: str, stops: list[str]) -> str:
    """The text up to and including the first stop string (all of it when none occurs)."""
    ends = [text.find(s) + len(s) for s in stops if s and s in text]
    return text[:min(ends)] if ends else text


@dataclasses.dataclass
class Settings:
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    repetition_penalty: float
    seed: int
    block: int | None = None  # TiDAR's draft length; None: plain decoding
    beta: float = 1.0


def warn_past_training_length(loaded: Loaded, length: int) -> None:
    """A one-line note on stderr when decoding reaches positions the run never trained on (and no
    sliding window of at most the trained length bounds what attention sees): past them the output
    quietly degrades (untrained learned positions, RoPE extrapolation)."""
    window = loaded.cfg.attention.window
    if loaded.trained_len is None or length <= loaded.trained_len or (window is not None and window <= loaded.trained_len):
        return
    print(f"note: prompt + max-new-tokens reach {length} tokens, past the {loaded.trained_len}-token sequences this "
          f"model was trained on; text past position {loaded.trained_len} may degrade", file=sys.stderr)


def decode_texts(loaded: Loaded, texts: list[str], settings: Settings, *, stops: list[str], eos_id: int | None,
                 cached: bool, stream: bool) -> list[str]:
    """The continuations of `texts` (prompt excluded), truncated after a stop string. stream: row 0's
    prompt and then its new text go to stdout as they are generated."""
    from jaxllm.decode import Sampling, validate_request

    tok = loaded.tokenizer
    prompts = [encode_prompt(tok, text, i) for i, text in enumerate(texts)]
    sampling = Sampling(settings.temperature, settings.top_k, settings.top_p, settings.min_p,
                        settings.repetition_penalty).validate()
    validate_request(loaded.cfg, prompts, settings.max_new_tokens, eos_id)
    warn_past_training_length(loaded, max(map(len, prompts)) + settings.max_new_tokens)
    stop_ids = [encode_prompt(tok, s) for s in stops]
    printer = StreamPrinter(tok, stops) if stream else None
    if stream:  # the prompt first, once it is known to be decodable
        sys.stdout.write(texts[0])
        sys.stdout.flush()
    stats = None
    if loaded.engine == "jax":
        from jaxllm.decode import TiDAR, generate_long

        speculative = None if settings.block is None else TiDAR(settings.block, settings.beta)
        outs = generate_long(loaded.model, prompts, max_new_tokens=settings.max_new_tokens, sampling=sampling,
                             eos_id=eos_id, stop_sequences=stop_ids, seed=settings.seed, cached=cached,
                             on_token=printer, speculative=speculative, return_stats=speculative is not None)
        if speculative is not None:
            outs, stats = outs
    else:
        from torch_ref.generate import generate

        outs = generate(loaded.model, prompts, settings.max_new_tokens, settings.temperature, settings.top_k,
                        settings.top_p, settings.min_p, settings.repetition_penalty, eos_id, stop_ids,
                        settings.seed, cached, printer, speculative=None if settings.block is None else "tidar",
                        block=settings.block or 1, beta=settings.beta, return_stats=settings.block is not None)
        if settings.block is not None:
            from jaxllm.decode import DecodeStats

            outs, accepted = outs
            stats = DecodeStats(settings.block, accepted)
    texts = [truncate_at_stop(tok.decode([i for i in ids if i != eos_id]), stops) for ids in outs]
    if printer is not None:
        sys.stdout.write(texts[0][printer.printed:])  # whatever the stream held back
    if stats is not None:
        print_stats(stats)
    return texts


def print_stats(stats) -> None:
    """TiDAR's figures for one generation, on stderr (stdout holds the text)."""
    sys.stdout.flush()
    hist = " ".join(f"{n}:{c}" for n, c in enumerate(stats.histogram()))
    print(f"\n[tidar block {stats.block}] {stats.tokens_per_forward:.2f} tokens per forward over "
          f"{stats.forwards} forwards, acceptance {100 * stats.acceptance_rate:.1f}% of drafts; "
          f"forwards by drafts accepted: {hist}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# The prompt loop

HELP = """commands (a line not starting with / is a prompt):
  /temperature X   /top_k K   /top_p P   /min_p P   /repetition_penalty R   /length N   /seed S
  /settings        show the settings
  /help            this list
  /quit            leave (also Ctrl-D)"""

FIELDS = {"temperature": ("temperature", float), "top_k": ("top_k", int), "top_p": ("top_p", float),
          "min_p": ("min_p", float), "repetition_penalty": ("repetition_penalty", float),
          "length": ("max_new_tokens", int), "max_new_tokens": ("max_new_tokens", int), "seed": ("seed", int)}


def interactive(loaded: Loaded, settings: Settings, *, stops, eos_id, cached, stream, read=input) -> int:
    print(f"jaxllm sample: {loaded.cfg.n_layer} layers, width {loaded.cfg.d_model}, context "
          f"{loaded.cfg.max_seq_len}, engine {loaded.engine}. Type a prompt, or /help.")
    while True:
        try:
            line = read("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not line.strip():
            continue
        if line.startswith("/"):
            parts = line[1:].split()
            name = parts[0].replace("-", "_") if parts else ""
            if name in ("quit", "exit", "q"):
                return 0
            if name == "help":
                print(HELP)
            elif name == "settings":
                print(", ".join(f"{k} {v}" for k, v in dataclasses.asdict(settings).items()))
            elif name in FIELDS and len(parts) == 2:
                field, kind = FIELDS[name]
                try:
                    candidate = dataclasses.replace(settings, **{field: kind(parts[1])})
                    check_settings(candidate)
                except ValueError as e:  # DecodeError too
                    msg = str(e) if isinstance(e, DecodeError) else f"{name} needs a {kind.__name__}, got {parts[1]!r}"
                    print(f"error: {msg}")
                    continue
                settings = candidate
                print(f"{field} = {getattr(settings, field)}")
            else:
                print(f"error: unknown command {line.strip()!r}; type /help")
            continue
        try:
            texts = decode_texts(loaded, [line], settings, stops=stops, eos_id=eos_id, cached=cached, stream=stream)
            print("" if stream else line + texts[0])
        except DecodeError as e:
            print(f"error: {e}")


def speculative_settings(args, cfg) -> tuple[int | None, float]:
    """(block, beta) from --speculative / --block / --beta, checked: one-line errors."""
    if args.speculative is None:
        for flag, value in (("--block", args.block), ("--beta", args.beta)):
            if value is not None:
                raise DecodeError(f"{flag} is {value}, but it only applies with --speculative tidar")
        return None, 1.0
    from jaxllm.decode import TiDAR

    spec = TiDAR(cfg.diffusion.block_size if args.block is None else args.block,
                 1.0 if args.beta is None else args.beta).validate(cfg)
    if args.no_cache:
        raise DecodeError("--speculative needs the KV cache; drop --no-cache")
    return spec.block, spec.beta


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    from jaxllm.platform import select_platform

    if args.prompt is None and args.prompt_file is None and not args.interactive:
        raise DataError("nothing to do: give --prompt TEXT, --prompt-file FILE or --interactive")
    settings = Settings(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.min_p,
                        args.repetition_penalty, args.seed)
    check_settings(settings)  # before any file is read or the model loaded
    texts = None
    if args.prompt_file is not None:
        from jaxllm.files import read_text

        lines = read_text(args.prompt_file, "prompt file").split("\n")
        texts = [line.replace("\\n", "\n") for line in lines if line.strip()]  # a literal \n: as --prompt
        if not texts:
            raise DataError(f"prompt file {str(args.prompt_file)!r} holds no prompt (one per line)")
    elif args.prompt is not None:
        texts = [args.prompt.replace("\\n", "\n")]
    select_platform(args.platform)
    loaded = load(args)
    block, beta = speculative_settings(args, loaded.cfg)
    settings = dataclasses.replace(settings, block=block, beta=beta)
    eos_id = eos_of(loaded.tokenizer, args.eos_id)
    cached = not args.no_cache
    if args.interactive:
        return interactive(loaded, settings, stops=args.stop, eos_id=eos_id, cached=cached, stream=not args.no_stream)
    stream = not args.no_stream and len(texts) == 1
    outs = decode_texts(loaded, texts, settings, stops=args.stop, eos_id=eos_id, cached=cached, stream=stream)
    if stream:
        sys.stdout.write("\n")
    else:
        for i, (text, out) in enumerate(zip(texts, outs)):
            if len(texts) > 1:
                print(f"--- prompt {i} ---")
            print(text + out)
    return 0
