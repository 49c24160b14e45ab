"""The config tree: typed dataclasses, YAML presets, `key=value` overrides, validation.

A config is a `Config` with two sections, `model` (a `ModelConfig`, itself made of nested
sections) and `train`. Presets are YAML files in `configs/` holding any subset of the fields;
everything else keeps its default. Overrides use dotted paths: `model.attention.n_kv_head=2`.

`load_config(path, overrides)` returns a validated, *resolved* config: derived fields that the
user may leave unset (`head_dim`, `n_kv_head`, `d_ff`, MLA's `rope_theta`, ...) are filled in, so every consumer
(the JAX model, torch_ref, converters) reads one set of concrete numbers.

Every mistake is a `ConfigError` whose message is one line naming the field, the bad value and
what is allowed.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Literal

import yaml

from jaxllm.errors import ConfigError

_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


@dataclasses.dataclass(frozen=True)
class PositionConfig:
    kind: Literal["learned", "rope", "none"] = "learned"
    rope_theta: float = 10000.0  # RoPE base (kind 'rope' only); Hugging Face's half-split (rotate_half) layout


@dataclasses.dataclass(frozen=True)
class NormConfig:
    kind: Literal["layernorm", "rmsnorm"] = "layernorm"
    eps: float = 1e-5
    bias: bool = True  # LayerNorm only: learned shift (RMSNorm never has one)


@dataclasses.dataclass(frozen=True)
class MLAConfig:
    """Multi-head Latent Attention (DeepSeek-V2/V3, papers.md §3), used when attention.kind is 'mla'."""
    variant: Literal["deepseek", "seed004"] = "deepseek"  # seed004: per-head rope_k / rope_q projections
    q_lora_rank: int | None = None  # None: a plain query projection (V2-Lite)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    rope_layout: Literal["interleaved", "half"] = "interleaved"  # DeepSeek checkpoints: interleaved pairs
    latent_norm_eps: float = 1e-6
    # Base of the decoupled rope dims, which MLA rotates whatever position.kind says. None: resolved
    # to position.rope_theta when position.kind is 'rope', else 10000 (seed 004: learned positions).
    rope_theta: float | None = None
    yarn_factor: float | None = None  # YaRN rope scaling (None: off)
    yarn_original_max_position: int = 4096
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_mscale: float = 1.0
    yarn_mscale_all_dim: float = 0.0


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    kind: Literal["mha", "mla"] = "mha"  # mha covers MHA / GQA / MQA through n_kv_head
    mla: MLAConfig = MLAConfig()
    n_head: int = 6
    n_kv_head: int | None = None  # None = n_head (MHA); 1 = MQA; otherwise GQA
    head_dim: int | None = None  # None = d_model // n_head
    window: int | None = None  # sliding window: a query sees exactly `window` keys incl. itself
    qkv_bias: bool = False
    out_bias: bool = False
    dropout: float = 0.0  # on attention probabilities, training only
    # the kernel: auto = cuDNN's fused one on GPU where it applies, einsum otherwise
    # (attention.implementation); the numbers are the same up to float rounding
    implementation: Literal["auto", "einsum", "xla", "cudnn"] = "auto"


@dataclasses.dataclass(frozen=True)
class MLPConfig:
    kind: Literal["gelu", "gelu_tanh", "swiglu"] = "gelu"
    d_ff: int | None = None  # None = 4 * d_model (gelu) or 8/3 * d_model rounded up to 256 (swiglu)
    bias: bool = False
    dropout: float = 0.0  # on the hidden activations, training only


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Mixture-of-Experts feed-forward (papers.md §4). n_routed_experts = 0 means a dense model.

    Layer i uses MoE when i >= first_k_dense and (i - first_k_dense) % moe_every == 0; other
    layers use the dense `mlp` section.
    """
    n_routed_experts: int = 0
    num_experts_per_tok: int = 2
    moe_intermediate_size: int | None = None  # routed expert width; None = mlp.d_ff
    n_shared_experts: int = 0  # DeepSeek: always-on SwiGLU experts, merged into one of width n * shared width
    shared_intermediate_size: int | None = None  # per shared expert; None = moe_intermediate_size
    shared_expert_gate: bool = False  # Qwen2-MoE: sigmoid(x . w) gates the shared expert
    router: Literal["softmax", "sigmoid", "noisy"] = "softmax"
    norm_topk_prob: bool = True  # renormalise the top-k weights to sum to 1
    routed_scaling_factor: float = 1.0
    n_group: int = 1  # group-limited selection: keep the best topk_group of n_group expert groups
    topk_group: int = 1
    bias_update_rate: float = 0.0  # sigmoid router: V3 aux-loss-free bias step (gamma)
    aux_loss_coef: float = 0.0  # Switch / DeepSeek expert balance loss
    z_loss_coef: float = 0.0  # ST-MoE router z-loss
    importance_loss_coef: float = 0.0  # noisy router (Shazeer 2017): CV^2 of importance
    load_loss_coef: float = 0.0  # noisy router: CV^2 of the smooth load estimate
    capacity_factor: float | None = None  # None: dropless; else drop tokens beyond the capacity
    first_k_dense: int = 0
    moe_every: int = 1
    dispatch: Literal["grouped", "dense"] = "grouped"  # dense: every expert on every token (tests only)


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
    """TiDAR dual-mode training (papers.md §1): the clean sequence plus a fully masked copy that
    drafts each block of `block_size` tokens from the clean prefix strictly before the block."""
    enabled: bool = False
    block_size: int = 8
    alpha: float = 1.0  # loss = (alpha * AR + diffusion) / (1 + alpha)
    mask_token_id: int | None = None  # the reserved [MASK] id; None = the last id, vocab_size - 1


@dataclasses.dataclass(frozen=True)
class RecursionConfig:
    """A looped core of layers with shared parameters (papers.md §2.6) or the TRM pattern (§2.1).

    Layers [0, n_prelude) run once, layers [n_prelude, n_prelude + n_core) form the core, the
    rest are the coda. `loop`: s = core(inject(s, e)) n_loops times, e the prelude's output.
    `trm`: n_loops cycles of (z = core(inject(y + z, e)) n_latent_steps times; y = core(y + z)).
    The first n_loops - n_grad_loops loops (cycles) run without gradient.
    """
    mode: Literal["none", "loop", "trm"] = "none"
    n_prelude: int = 0
    n_core: int = 1
    n_loops: int = 4  # r (loop) or T (trm cycles); the mean of the draw when random_loops
    n_grad_loops: int | None = None  # k: loops with gradient, the last ones; None = all
    n_latent_steps: int = 6  # trm: n latent updates per cycle
    inject: Literal["add", "concat"] = "add"  # s + e, or a linear map of [s, e] (Huginn's adapter)
    init: Literal["zeros", "embedding", "random"] = "zeros"  # random: a fixed random vector (TRM)
    random_loops: bool = False  # training only: r ~ Poisson(LogNormal(ln n_loops - 1/8, 1/2)) + 1


@dataclasses.dataclass(frozen=True)
class TRMConfig:
    """The Tiny Recursive Model (papers.md §2.1-2.3), a puzzle solver, not a language model: when
    enabled the model is `jaxllm.model.trm.TRM`, trained with deep supervision on a puzzle file
    (train.data) through the same scripts/train.py. Its core is model.n_layer post-norm blocks
    (parameter-free RMSNorm, non-causal attention or the sequence MLP, model.mlp's SwiGLU) of
    model.d_model; model.vocab_size and model.max_seq_len are set from the puzzle file.

    One supervision step is one deep recursion: h_cycles (T) cycles of l_cycles (n) latent updates
    z = core(x + y + z) and one answer update y = core(y + z), the first T - 1 cycles without
    gradient; (y, z) are carried, detached, to the next step. At most n_sup steps per puzzle; in
    training the halting head stops a puzzle early when its logit is > 0.
    """
    enabled: bool = False
    mode: Literal["recursive", "plain"] = "recursive"  # plain: the core once on the input (the baseline)
    h_cycles: int = 3  # T
    l_cycles: int = 6  # n
    n_sup: int = 16  # supervision steps per puzzle (the official halt_max_steps)
    mixer: Literal["attention", "mlp"] = "attention"  # mlp: TRM-MLP, a SwiGLU over the sequence axis
    n_prefix: int = 1  # learned positions before the puzzle (one puzzle kind's embedding); q_head reads the first
    halt_exploration: float = 0.1  # training: the probability of a drawn minimum number of steps
    ema_decay: float | None = 0.999  # an EMA of the weights, used for evaluation (null: none)
    stablemax: bool = False  # stablemax cross-entropy (s(x) = x + 1 for x >= 0, 1 / (1 - x) below)


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapters (LoRA, Hu et al. 2021) on the projections whose paths match `targets`
    (globs such as 'layers.*.attn.q_proj'): W x + (alpha / rank) B A x, with A [in, rank] drawn as
    PEFT's kaiming-uniform and B [rank, out] zeros, so an adapted model starts equal to its base.
    While rank > 0, training updates only the adapters unless train.trainable says otherwise;
    `scripts/convert.py --merge-lora` folds them into the weights. rank 0: no adapters."""
    rank: int = 0
    alpha: float = 16.0
    targets: tuple[str, ...] = ("layers.*.attn.q_proj", "layers.*.attn.v_proj")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 256
    d_model: int = 384
    n_layer: int = 6
    max_seq_len: int = 1024  # context length; size of the learned position table
    position: PositionConfig = PositionConfig()
    norm: NormConfig = NormConfig()
    attention: AttentionConfig = AttentionConfig()
    mlp: MLPConfig = MLPConfig()
    moe: MoEConfig = MoEConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    recursion: RecursionConfig = RecursionConfig()
    trm: TRMConfig = TRMConfig()
    lora: LoRAConfig = LoRAConfig()
    tie_embeddings: bool = True
    lm_head_bias: bool = False
    dropout: float = 0.0  # on embeddings and on each sublayer output before the residual add
    rezero: bool = False  # x + alpha_l * f(x), one alpha per layer (init 0), no block norms
    layerdrop: float = 0.0  # probability of skipping a whole layer, training only
    remat: bool = False  # rematerialise each block in the backward pass
    # the layers as one lax.scan (XLA compiles one block, not n_layer; same numbers). Off by default:
    # on XLA:CPU it compiled slower at 24-48 layers (docs/perf.md). Not with dropout, LayerDrop,
    # MoE or recursion
    scan_layers: bool = False
    init_std: float = 0.02
    # how weights are drawn: 'normal' N(0, init_std^2) everywhere; 'xavier_uniform' U(+-sqrt(6 / (fan_in +
    # fan_out))) for every projection (attention, MLP, experts, untied head; embeddings and routers stay
    # normal); 'scaled' GPT-2's: normal, with the residual output projections (o_proj, down_proj) at
    # init_std / sqrt(2 n_layer)
    init: Literal["normal", "xavier_uniform", "scaled"] = "normal"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # compute dtype
    param_dtype: Literal["float32", "bfloat16"] = "float32"


@dataclasses.dataclass(frozen=True)
class CurriculumStage:
    """One curriculum stage (seed 002): train at this shape until validation perplexity <= until_ppl."""
    seq_len: int
    batch_size: int
    until_ppl: float | None = None  # None: the last stage, kept to the end


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Training (docs/training.md). Steps count optimizer updates; a batch is batch_size sequences."""
    seed: int = 0
    batch_size: int = 8  # sequences per optimizer step, over all devices and accumulation steps
    seq_len: int | None = None  # None = model.max_seq_len
    # data and tokenizer
    data: str = "stdlib"  # a .txt/.jsonl file, a directory of them, or 'stdlib' (Python's own .py files)
    text_field: str = "text"  # JSONL: the field holding each document's text
    max_corpus_bytes: int | None = 4_000_000  # 'stdlib' only: stop reading files after this many bytes
    val_fraction: float = 0.1  # the last part of the token stream is the validation split
    tokenizer: str = "char"  # 'char', 'bpe' (byte-level, trained on the corpus), or a tokenizer.json path
    bpe_vocab_size: int = 4096
    # optimisation
    max_steps: int = 1000
    # stop earlier, with a checkpoint, once this process has trained this many minutes (checked at
    # every log step; for runs compared at equal wall time); None: no limit
    max_minutes: float | None = None
    grad_accum: int = 1  # micro-batches per optimizer step (optax.MultiSteps)
    optimizer: Literal["adamw", "lion"] = "adamw"
    lr: float = 1e-3  # peak learning rate, after linear warmup; cosine decay to min_lr at max_steps
    min_lr: float = 1e-4
    warmup_steps: int = 100
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.1  # decoupled; never on norms and biases
    decay_embeddings: bool = False  # also decay the token / position tables
    # fine-tuning: glob patterns over the parameter paths (e.g. 'layers.*.mlp.*', 'lm_head'; a pattern
    # also matches every path under it) that train; the rest are frozen (no gradient, no optimizer
    # state, never updated). None: everything trains
    trainable: tuple[str, ...] | None = None
    # fine-tuning: the weights the run starts from (a Hugging Face directory, a GGUF file, torch_ref
    # safetensors or a jaxllm run / checkpoint; set by `train.py --init-from`, which also takes the
    # model config from them). The optimizer starts fresh; resuming the run reads its own checkpoints
    init_from: str | None = None
    # float16 training: the loss is multiplied by a scale before the backward pass and the gradient
    # divided by it (jmp), so that small gradients do not underflow in float16. 'dynamic': start at
    # 2**15, halve at a non-finite gradient (the update is skipped), double after 2000 finite steps;
    # a number: that fixed scale; null: none (bfloat16 and float32 do not need it)
    loss_scale: float | Literal["dynamic"] | None = None
    grad_clip: float | None = 1.0  # global-norm clipping (None: off)
    # tokens per piece of the chunked cross-entropy (the [B, T, V] float32 logits never whole);
    # 0: one piece; None: 2048 when the vocabulary has >= 16384 entries, else one piece
    loss_chunk: int | None = None
    # an update whose loss or gradient is non-finite is skipped; this many in a row stop the run
    max_nonfinite_steps: int = 5
    # parallelism
    mesh: str = "data:-1"  # mesh axes data, fsdp, tensor, expert; -1 takes the remaining devices
    # on the CPU, split it into this many devices for the mesh (None: the product of train.mesh's fixed
    # sizes, else one per core, at most 8, as many as divide the micro-batch and fit the state in
    # memory; 1: one device); ignored on other backends
    cpu_devices: int | None = None
    # evaluation, checkpoints, logging
    eval_every: int = 200
    eval_batches: int = 20
    sample_every: int = 500  # 0: never
    sample_tokens: int = 200
    sample_prompt: str = "\n"
    sample_temperature: float = 0.8
    checkpoint_every: int = 500
    keep_checkpoints: int = 3  # the last k, plus the best by validation loss
    log_every: int = 10
    wandb: Literal["offline", "online", "disabled"] = "offline"  # WANDB_MODE, when set, wins
    wandb_project: str = "jaxllm"
    curriculum: tuple[CurriculumStage, ...] = ()  # empty: one stage of batch_size x seq_len


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()


# ---------------------------------------------------------------------------------------------
# Building from plain data


def type_name(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    return "null" if tp is type(None) else tp.__name__


def _coerce(value, tp, path: str):
    """Check `value` against the annotation `tp`; return it (ints are accepted for floats; nan and
    infinities never are: no field means anything by them)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{path}: got {value!r}, expected a finite number ({type_name(tp)})")
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, path)
            except ConfigError:
                pass
    elif origin is tuple:  # tuple[X, ...]: a YAML list
        if isinstance(value, (list, tuple)):
            (item,) = [a for a in typing.get_args(tp) if a is not Ellipsis]
            return tuple(_coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value))
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return _build(tp, value, path + ".")
    elif tp is type(None):
        if value is None:
            return None
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):  # YAML 1.1 reads 1e-6 as a string
            if not math.isfinite(float(value)):  # 1e999
                raise ConfigError(f"{path}: got {value!r}, which overflows to {float(value)}; expected a finite number")
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, tp):
        return value
    raise ConfigError(f"{path}: got {value!r} ({type(value).__name__}), expected {type_name(tp)}")


# Fields that live elsewhere than a reader might look (the issue texts used these names).
_MOVED = {"train.lora": "model.lora (LoRA adapters are model parameters: model.lora.rank, alpha, targets)"}


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in hints and path in _MOVED:
            raise ConfigError(f"unknown field {path!r}; it is {_MOVED[path]}")
        if key not in hints:
            raise ConfigError(f"unknown field {path!r}; allowed: {', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {'.'.join(parents[:i + 1])} is not a section")
        node = child
    node[leaf] = value


def parse_override(text: str) -> tuple[str, object]:
    """`model.n_layer=4` -> ('model.n_layer', 4). Values are parsed as YAML scalars."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: expected key=value with a dotted key, e.g. model.n_layer=4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def config_from_dict(data: dict, overrides: typing.Sequence[str] = ()) -> Config:
    data = _deep_copy(data or {})
    for text in overrides:
        _set_dotted(data, *parse_override(text))
    return resolve(_build(Config, data))


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """A resolved, validated Config from a YAML preset (or the defaults) plus overrides."""
    data = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} {'is a directory' if path.is_dir() else 'does not exist'}; "
                              f"give a YAML file such as configs/tiny-gpt.yaml")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {str(path)!r} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at "
                              f"offset {e.start}); allowed: a UTF-8 YAML file") from None
        except OSError as e:
            raise ConfigError(f"config file {str(path)!r} cannot be read: {e.strerror or e}") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {_yaml_reason(e)}") from None
        if data is None:
            raise ConfigError(f"config file {str(path)!r} is empty; allowed: a YAML mapping with model: and/or "
                              f"train: sections")
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(path)!r} holds a {type(data).__name__}; allowed: a YAML mapping with "
                              f"model: and/or train: sections")
    try:
        return config_from_dict(data, overrides)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path is not None else str(e)) from None


def _yaml_reason(e: yaml.YAMLError) -> str:
    """One line of a YAML error: the problem and where ('mapping values are not allowed here (line 2, column 8)')."""
    problem = getattr(e, "problem", None)
    mark = getattr(e, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(str(e).split())


def _deep_copy(data):
    return {k: _deep_copy(v) for k, v in data.items()} if isinstance(data, dict) else data


def to_dict(cfg) -> dict:
    """The config as plain data: what YAML, JSON (safetensors metadata) and config_from_dict read back
    to the same config (tuple fields become lists)."""
    def plain(x):
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    return plain(dataclasses.asdict(cfg))


def to_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# ---------------------------------------------------------------------------------------------
# Resolution and validation


def default_d_ff(mlp_kind: str, d_model: int) -> int:
    if mlp_kind == "swiglu":  # Llama: 2/3 of 4D, rounded up to a multiple of 256
        return 256 * math.ceil(int(8 * d_model / 3) / 256)
    return 4 * d_model


def _validate_scan_layers(m: ModelConfig) -> None:
    """model.scan_layers needs blocks that record nothing and draw no randomness."""
    blockers = [name for name, on in (("dropout", m.dropout or m.attention.dropout or m.mlp.dropout),
                                      ("layerdrop", m.layerdrop), ("moe", m.moe.n_routed_experts),
                                      ("recursion", m.recursion.mode != "none")) if on]
    if m.scan_layers and blockers:
        raise ConfigError(f"model.scan_layers=True is invalid with {', '.join(blockers)}: must be false "
                          "(scanned layers draw no randomness and record nothing)")


def resolve(cfg: Config) -> Config:
    m = cfg.model
    _validate_model(m)
    attention = m.attention
    if attention.n_kv_head is None:
        attention = dataclasses.replace(attention, n_kv_head=attention.n_head)
    if attention.head_dim is None:
        attention = dataclasses.replace(attention, head_dim=m.d_model // attention.n_head)
    mlp = m.mlp if m.mlp.d_ff is not None else dataclasses.replace(m.mlp, d_ff=default_d_ff(m.mlp.kind, m.d_model))
    moe = m.moe
    if moe.n_routed_experts and moe.moe_intermediate_size is None:
        moe = dataclasses.replace(moe, moe_intermediate_size=mlp.d_ff)
    if moe.n_routed_experts and moe.shared_intermediate_size is None:
        moe = dataclasses.replace(moe, shared_intermediate_size=moe.moe_intermediate_size)
    if attention.kind == "mla" and attention.mla.rope_theta is None:
        theta = m.position.rope_theta if m.position.kind == "rope" else 10000.0
        attention = dataclasses.replace(attention, mla=dataclasses.replace(attention.mla, rope_theta=theta))
    model = dataclasses.replace(m, attention=attention, mlp=mlp, moe=moe)
    train = cfg.train
    _validate_train(train, model)
    return Config(model=model, train=train)


def _validate_train(t: TrainConfig, model: ModelConfig) -> None:
    _check(t.batch_size >= 1, "train.batch_size", t.batch_size, "an integer >= 1")
    if t.seq_len is not None:
        _check(1 <= t.seq_len <= model.max_seq_len, "train.seq_len", t.seq_len,
               f"1..model.max_seq_len ({model.max_seq_len})")
    for name in ("max_steps", "grad_accum", "eval_every", "eval_batches", "checkpoint_every",
                 "keep_checkpoints", "log_every", "sample_tokens", "bpe_vocab_size", "max_nonfinite_steps"):
        _check(getattr(t, name) >= 1, f"train.{name}", getattr(t, name), "an integer >= 1")
    _check(t.batch_size % t.grad_accum == 0, "train.grad_accum", t.grad_accum,
           f"a divisor of train.batch_size ({t.batch_size})")
    if model.trm.enabled:
        _check(t.grad_accum == 1, "train.grad_accum", t.grad_accum,
               "1 when model.trm.enabled (TRM trains one supervision step per update)")
        _check(t.trainable is None, "train.trainable", t.trainable, "null when model.trm.enabled (TRM trains all)")
        _check(t.loss_scale is None, "train.loss_scale", t.loss_scale, "null when model.trm.enabled")
        _check(t.init_from is None, "train.init_from", t.init_from, "null when model.trm.enabled")
    if isinstance(t.loss_scale, float):
        _check(t.loss_scale >= 1.0, "train.loss_scale", t.loss_scale, "'dynamic', a number >= 1, or null")
    if t.trainable is not None:
        _check(len(t.trainable) > 0 and all(isinstance(p, str) and p for p in t.trainable), "train.trainable",
               t.trainable, "a non-empty list of glob patterns over parameter paths, or null")
    _check(0.0 < t.val_fraction < 1.0, "train.val_fraction", t.val_fraction, "in (0, 1)")
    _check(t.tokenizer in ("char", "bpe") or t.tokenizer.endswith(".json"), "train.tokenizer", t.tokenizer,
           "'char', 'bpe' or a path to a tokenizer.json")
    if t.max_minutes is not None:
        _check(t.max_minutes > 0, "train.max_minutes", t.max_minutes, "> 0 (or null for no limit)")
    _check(t.lr > 0, "train.lr", t.lr, "> 0")
    _check(0 <= t.min_lr <= t.lr, "train.min_lr", t.min_lr, f"in [0, train.lr ({t.lr})]")
    _check(0 <= t.warmup_steps < t.max_steps, "train.warmup_steps", t.warmup_steps,
           f"in [0, train.max_steps ({t.max_steps}))")
    for name in ("beta1", "beta2"):
        _check(0.0 <= getattr(t, name) < 1.0, f"train.{name}", getattr(t, name), "in [0, 1)")
    _check(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, ">= 0")
    if t.grad_clip is not None:
        _check(t.grad_clip > 0, "train.grad_clip", t.grad_clip, "> 0 (or null for no clipping)")
    if t.loss_chunk is not None:
        _check(t.loss_chunk >= 0, "train.loss_chunk", t.loss_chunk, "an integer >= 0 (0: one piece; null: auto)")
    _check(t.sample_every >= 0, "train.sample_every", t.sample_every, "an integer >= 0 (0 = never)")
    _check(t.sample_temperature > 0, "train.sample_temperature", t.sample_temperature, "> 0")
    mesh_axes(t.mesh)
    if t.cpu_devices is not None:
        _check(t.cpu_devices >= 1, "train.cpu_devices", t.cpu_devices, "an integer >= 1 (or null: one per core)")
    for i, stage in enumerate(t.curriculum):
        p = f"train.curriculum[{i}]."
        _check(1 <= stage.seq_len <= model.max_seq_len, p + "seq_len", stage.seq_len,
               f"1..model.max_seq_len ({model.max_seq_len})")
        _check(stage.batch_size >= 1 and stage.batch_size % t.grad_accum == 0, p + "batch_size", stage.batch_size,
               f"a positive multiple of train.grad_accum ({t.grad_accum})")
        last = i == len(t.curriculum) - 1
        _check((stage.until_ppl is None) == last, p + "until_ppl", stage.until_ppl,
               "null for the last stage only" if last else "a perplexity > 1 (null only on the last stage)")


MESH_AXES = ("data", "fsdp", "tensor", "expert")


def mesh_axes(spec: str) -> dict[str, int]:
    """The axis sizes of a `train.mesh` spec, every axis present: 'data:2,fsdp:-1' ->
    {'data': 2, 'fsdp': -1, 'tensor': 1, 'expert': 1}. Checks the syntax and the axis names (at most
    one -1, which takes the remaining devices); the device arithmetic waits for the run
    (`jaxllm.sharding.make_mesh`)."""
    sizes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, size = part.partition(":")
        name = name.strip()
        if not sep or name not in MESH_AXES or name in sizes:
            raise ConfigError(f"train.mesh={spec!r}: bad entry {part!r}; expected name:size with names "
                              f"{', '.join(MESH_AXES)} (each once), e.g. data:2,fsdp:-1")
        try:
            sizes[name] = int(size)
        except ValueError:
            raise ConfigError(f"train.mesh={spec!r}: size {size.strip()!r} of {name} is not an integer") from None
        if sizes[name] < 1 and sizes[name] != -1:
            raise ConfigError(f"train.mesh={spec!r}: size of {name} must be >= 1 or -1")
    if list(sizes.values()).count(-1) > 1:
        raise ConfigError(f"train.mesh={spec!r}: at most one axis may be -1")
    return {name: sizes.get(name, 1) for name in MESH_AXES}


def _check(ok: bool, field: str, value, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{field}={value!r} is invalid: must be {allowed}")


def _validate_model(m: ModelConfig) -> None:
    a = m.attention
    _check(m.vocab_size >= 1, "model.vocab_size", m.vocab_size, "an integer >= 1")
    _check(m.d_model >= 1, "model.d_model", m.d_model, "an integer >= 1")
    _check(m.n_layer >= 1, "model.n_layer", m.n_layer, "an integer >= 1")
    _check(m.max_seq_len >= 1, "model.max_seq_len", m.max_seq_len, "an integer >= 1")
    _check(a.n_head >= 1, "model.attention.n_head", a.n_head, "an integer >= 1")
    if a.head_dim is None:
        _check(m.d_model % a.n_head == 0, "model.attention.n_head", a.n_head,
               f"a divisor of model.d_model ({m.d_model}), or set model.attention.head_dim")
    else:
        _check(a.head_dim >= 1, "model.attention.head_dim", a.head_dim, "an integer >= 1")
    if a.n_kv_head is not None:
        _check(a.n_kv_head >= 1 and a.n_head % a.n_kv_head == 0, "model.attention.n_kv_head", a.n_kv_head,
               f"a divisor of model.attention.n_head ({a.n_head})")
    if m.position.kind == "rope":
        head_dim = a.head_dim or m.d_model // a.n_head
        _check(head_dim % 2 == 0, "model.attention.head_dim", head_dim, "even when model.position.kind is 'rope'")
        _check(m.position.rope_theta > 0, "model.position.rope_theta", m.position.rope_theta, "> 0")
    if a.window is not None:
        _check(a.window >= 1, "model.attention.window", a.window, "an integer >= 1 (or null for full causal)")
    _check(m.norm.eps > 0, "model.norm.eps", m.norm.eps, "> 0")
    if m.mlp.d_ff is not None:
        _check(m.mlp.d_ff >= 1, "model.mlp.d_ff", m.mlp.d_ff, "an integer >= 1")
    for field, p in (("model.dropout", m.dropout), ("model.attention.dropout", a.dropout),
                     ("model.mlp.dropout", m.mlp.dropout)):
        _check(0.0 <= p < 1.0, field, p, "a probability in [0, 1)")
    _check(0.0 <= m.layerdrop < 1.0, "model.layerdrop", m.layerdrop, "a probability in [0, 1)")
    _check(m.init_std > 0, "model.init_std", m.init_std, "> 0")
    _check(m.lora.rank >= 0, "model.lora.rank", m.lora.rank, "an integer >= 0 (0: no adapters)")
    if m.lora.rank:
        _check(m.lora.alpha > 0, "model.lora.alpha", m.lora.alpha, "> 0")
        _check(len(m.lora.targets) > 0 and all(m.lora.targets), "model.lora.targets", m.lora.targets,
               "a non-empty list of glob patterns over projection paths, e.g. 'layers.*.attn.q_proj'")
        _check(not m.scan_layers, "model.scan_layers", m.scan_layers, "false with LoRA adapters")
    if a.kind == "mla":
        _validate_mla(a.mla, m.position)
    if m.moe.n_routed_experts:
        _validate_moe(m.moe, m.n_layer)
    if m.diffusion.enabled:
        _validate_diffusion(m.diffusion, m)
    if m.recursion.mode != "none":
        _validate_recursion(m.recursion, m)
    if m.trm.enabled:
        _validate_trm(m.trm, m)
    _validate_scan_layers(m)


def _validate_diffusion(d: DiffusionConfig, m: ModelConfig) -> None:
    p = "model.diffusion."
    _check(d.block_size >= 1, p + "block_size", d.block_size, "an integer >= 1")
    _check(d.alpha >= 0, p + "alpha", d.alpha, ">= 0")
    if d.mask_token_id is not None:
        _check(0 <= d.mask_token_id < m.vocab_size, p + "mask_token_id", d.mask_token_id,
               f"0..model.vocab_size - 1 ({m.vocab_size - 1}), or null for the last id")


def _validate_recursion(r: RecursionConfig, m: ModelConfig) -> None:
    p = "model.recursion."
    _check(r.n_prelude >= 0, p + "n_prelude", r.n_prelude, "an integer >= 0")
    _check(r.n_core >= 1 and r.n_prelude + r.n_core <= m.n_layer, p + "n_core", r.n_core,
           f"1..model.n_layer - n_prelude ({m.n_layer - r.n_prelude})")
    _check(r.n_loops >= 1, p + "n_loops", r.n_loops, "an integer >= 1")
    if r.n_grad_loops is not None:
        _check(1 <= r.n_grad_loops <= r.n_loops, p + "n_grad_loops", r.n_grad_loops,
               f"1..n_loops ({r.n_loops}), or null for all")
    _check(r.n_latent_steps >= 1, p + "n_latent_steps", r.n_latent_steps, "an integer >= 1")
    _check(m.layerdrop == 0.0, "model.layerdrop", m.layerdrop, "0 when model.recursion is on (loops never skip layers)")


def _validate_trm(t: TRMConfig, m: ModelConfig) -> None:
    p = "model.trm."
    for name in ("h_cycles", "l_cycles", "n_sup"):
        _check(getattr(t, name) >= 1, p + name, getattr(t, name), "an integer >= 1")
    _check(t.n_prefix >= 0, p + "n_prefix", t.n_prefix, "an integer >= 0")
    _check(0.0 <= t.halt_exploration <= 1.0, p + "halt_exploration", t.halt_exploration, "a probability in [0, 1]")
    if t.ema_decay is not None:
        _check(0.0 < t.ema_decay < 1.0, p + "ema_decay", t.ema_decay, "in (0, 1), or null for no EMA")
    if t.mode == "plain":
        _check(t.n_sup == 1, p + "n_sup", t.n_sup, "1 when model.trm.mode is 'plain' (one pass, nothing carried)")
    for field, on, allowed in (
            ("model.recursion.mode", m.recursion.mode != "none", "'none' (TRM has its own recursion)"),
            ("model.diffusion.enabled", m.diffusion.enabled, "false"),
            ("model.moe.n_routed_experts", m.moe.n_routed_experts, "0"),
            ("model.attention.kind", m.attention.kind != "mha", "'mha'"),
            ("model.attention.window", m.attention.window is not None, "null (TRM attention sees every position)"),
            ("model.rezero", m.rezero, "false (TRM blocks are post-norm)"),
            ("model.layerdrop", m.layerdrop, "0"),
            ("model.scan_layers", m.scan_layers, "false"),
            ("model.init", m.init != "normal", "'normal' (TRM draws every weight at init_std)"),
            ("model.lora.rank", m.lora.rank, "0")):
        _check(not on, field, getattr_dotted(m, field.removeprefix("model.")), f"{allowed} when model.trm.enabled")


def getattr_dotted(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _validate_mla(mla: MLAConfig, position: PositionConfig) -> None:
    p = "model.attention.mla."
    if mla.rope_theta is not None:
        _check(mla.rope_theta > 0, p + "rope_theta", mla.rope_theta, "> 0")
        if position.kind == "rope":
            _check(mla.rope_theta == position.rope_theta, p + "rope_theta", mla.rope_theta,
                   f"null or model.position.rope_theta ({position.rope_theta}) when model.position.kind is 'rope'")
    for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
        _check(getattr(mla, name) >= 1, p + name, getattr(mla, name), "an integer >= 1")
    _check(mla.qk_rope_head_dim % 2 == 0, p + "qk_rope_head_dim", mla.qk_rope_head_dim, "even")
    if mla.q_lora_rank is not None:
        _check(mla.q_lora_rank >= 1, p + "q_lora_rank", mla.q_lora_rank, "an integer >= 1, or null for a plain q_proj")
    if mla.variant == "seed004":
        _check(mla.q_lora_rank is not None, p + "q_lora_rank", None, "set for the seed004 variant (rope_q reads the query latent)")
    if mla.yarn_factor is not None:
        _check(mla.yarn_factor >= 1.0, p + "yarn_factor", mla.yarn_factor, ">= 1 (or null for no YaRN)")
    _check(mla.latent_norm_eps > 0, p + "latent_norm_eps", mla.latent_norm_eps, "> 0")


def _validate_moe(moe: MoEConfig, n_layer: int) -> None:
    p = "model.moe."
    e = moe.n_routed_experts
    _check(e >= 1, p + "n_routed_experts", e, "an integer >= 0 (0 = dense)")
    _check(1 <= moe.num_experts_per_tok <= e, p + "num_experts_per_tok", moe.num_experts_per_tok,
           f"1..n_routed_experts ({e})")
    _check(moe.n_shared_experts >= 0, p + "n_shared_experts", moe.n_shared_experts, "an integer >= 0")
    _check(moe.n_group >= 1 and e % moe.n_group == 0, p + "n_group", moe.n_group, f"a divisor of n_routed_experts ({e})")
    _check(1 <= moe.topk_group <= moe.n_group, p + "topk_group", moe.topk_group, f"1..n_group ({moe.n_group})")
    _check(moe.num_experts_per_tok <= moe.topk_group * (e // moe.n_group), p + "num_experts_per_tok",
           moe.num_experts_per_tok, f"<= topk_group * experts per group ({moe.topk_group * (e // moe.n_group)})")
    _check(0 <= moe.first_k_dense <= n_layer, p + "first_k_dense", moe.first_k_dense, f"0..model.n_layer ({n_layer})")
    _check(moe.moe_every >= 1, p + "moe_every", moe.moe_every, "an integer >= 1")
    if moe.capacity_factor is not None:
        _check(moe.capacity_factor > 0, p + "capacity_factor", moe.capacity_factor, "> 0 (or null for dropless)")
    for name in ("aux_loss_coef", "z_loss_coef", "importance_loss_coef", "load_loss_coef", "bias_update_rate"):
        _check(getattr(moe, name) >= 0, p + name, getattr(moe, name), ">= 0")
    if moe.shared_expert_gate:
        _check(moe.n_shared_experts >= 1, p + "shared_expert_gate", True, "false unless n_shared_experts >= 1")
    if moe.bias_update_rate > 0:
        _check(moe.router == "sigmoid", p + "bias_update_rate", moe.bias_update_rate, "0 unless router is 'sigmoid'")
