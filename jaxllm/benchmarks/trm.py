"""`bench trm`: exact-puzzle accuracy of trained TRM runs on the held-out test puzzles, against
test-time depth.

For the run (its EMA weights; `jaxllm.train.trm.load_trm`) on its puzzle file's test split:

- accuracy after each supervision step 1..n_sup, for the trained (T, n) and each `--depths` pair;
- the halting head: the accuracy where it stops (the first step whose logit is > 0, else the
  last), the mean number of steps it chose, against always running n_sup, and the mean steps by
  puzzle difficulty (path length);
- each `--baseline` run (e.g. the plain transformer, model.trm.mode=plain) on the same puzzles.

Prints markdown tables and writes a PNG plot (`--plot`). Training time is in each run's
metrics.jsonl; the recipe that makes comparable runs is docs/trm.md.
"""
from __future__ import annotations

from pathlib import Path

from jaxllm.cli import ArgumentParser, positive_int


def depth_pairs(text: str) -> list[tuple[int, int]]:
    """'2x3,3x6' -> [(2, 3), (3, 6)] (T x n)."""
    import argparse

    try:
        pairs = [tuple(int(v) for v in part.split("x")) for part in text.split(",") if part]
        if not pairs or any(len(p) != 2 or min(p) < 1 for p in pairs):
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: allowed: comma-separated TxN pairs of integers >= 1, "
                                         f"e.g. 1x3,2x3,3x6") from None
    return pairs


def run(argv: list[str]) -> int:
    parser = ArgumentParser(prog="bench.py trm", description=__doc__)
    parser.add_argument("--run-dir", required=True, help="a TRM run directory (model.trm.enabled)")
    parser.add_argument("--baseline", action="append", default=[],
                        help="another run directory to score on the same puzzles, e.g. the plain transformer "
                             "(repeatable; default: none)")
    parser.add_argument("--depths", type=depth_pairs, default=None,
                        help="test-time T x n pairs besides the trained one, e.g. 1x3,2x6 (default: none)")
    parser.add_argument("--step", type=positive_int, default=None,
                        help="the run's checkpoint step (default: the latest); with --baseline-step, a comparison at "
                             "an earlier point of both runs")
    parser.add_argument("--baseline-step", type=positive_int, default=None,
                        help="the baselines' checkpoint step (default: their latest)")
    parser.add_argument("--puzzles", default=None, help="puzzle file (default: the run's train.data)")
    parser.add_argument("--limit", type=positive_int, default=None, help="first N test puzzles only (default: all)")
    parser.add_argument("--batch", type=positive_int, default=250, help="puzzles per forward (default: 250)")
    parser.add_argument("--plot", default=None, help="PNG path for the accuracy plot (default: none)")
    args = parser.parse_intermixed_args(argv)

    import jax
    import numpy as np

    from jaxllm.model.trm import solve
    from jaxllm.tasks.maze import difficulty, load_puzzles
    from jaxllm.train.trm import evaluate, load_trm

    model, step, cfg = load_trm(Path(args.run_dir), args.step)
    puzzles = load_puzzles(args.puzzles or cfg.train.data)
    if puzzles.seq_len != cfg.model.max_seq_len:
        from jaxllm.errors import DataError

        raise DataError(f"--puzzles {args.puzzles!r} has {puzzles.seq_len} cells per puzzle; the run was trained on "
                        f"{cfg.model.max_seq_len}")
    inputs, labels = puzzles.test_inputs[:args.limit], puzzles.test_labels[:args.limit]
    t = cfg.model.trm
    solve_fn = jax.jit(lambda tokens, **kw: solve(model, tokens, **kw), static_argnames=("n_sup", "h_cycles", "l_cycles"))
    depths = [(t.h_cycles, t.l_cycles)] + [d for d in (args.depths or []) if d != (t.h_cycles, t.l_cycles)]
    curves = {d: evaluate(solve_fn, inputs, labels, args.batch, t.n_sup, h_cycles=d[0], l_cycles=d[1]) for d in depths}
    trained = curves[depths[0]]

    print(f"{args.run_dir} at step {step}: {len(inputs)} test puzzles ({puzzles.meta.get('task')} "
          f"{puzzles.size}x{puzzles.size}); TRM T={t.h_cycles}, n={t.l_cycles}, n_sup={t.n_sup}, {t.mixer}\n")
    steps = sorted({1, 2, 4, 8, t.n_sup} & set(range(1, t.n_sup + 1)))
    print("| T x n (test) | effective depth / step | " + " | ".join(f"{s} sup. steps" for s in steps) + " |")
    print("|---|---|" + "---|" * len(steps))
    for (h, n), scores in curves.items():
        print(f"| {h} x {n}{' (trained)' if (h, n) == depths[0] else ''} | {h * (n + 1) * cfg.model.n_layer} | "
              + " | ".join(f"{100 * scores.by_step[s - 1]:.1f}%" for s in steps) + " |")

    print(f"\nhalting head (trained depth): {100 * trained.halted:.1f}% exact, mean {trained.mean_halt_steps:.2f} of "
          f"{t.n_sup} steps; always {t.n_sup} steps: {100 * trained.by_step[-1]:.1f}%")
    predictions, q_halt = (np.asarray(a) for a in jax.device_get(solve_fn(inputs[:args.batch], n_sup=t.n_sup)))
    stops = np.where(np.any(q_halt > 0, axis=0), np.argmax(q_halt > 0, axis=0), t.n_sup - 1) + 1
    lengths = np.array([difficulty(row, puzzles.size) for row in inputs[:args.batch]])
    print("\n| path length (cells) | puzzles | mean halting steps |\n|---|---|---|")
    for low, high in ((0, 8), (8, 14), (14, 20), (20, 10**6)):
        chosen = (lengths >= low) & (lengths < high)
        if chosen.any():
            print(f"| {low}-{high - 1 if high < 10**6 else 'max'} | {chosen.sum()} | {stops[chosen].mean():.2f} |")

    baselines = {}
    for other in args.baseline:
        b_model, b_step, b_cfg = load_trm(Path(other), args.baseline_step)
        b_solve = jax.jit(lambda tokens, m=b_model, **kw: solve(m, tokens, **kw), static_argnames=("n_sup",))
        baselines[other] = evaluate(b_solve, inputs, labels, args.batch, b_cfg.model.trm.n_sup)
        bt = b_cfg.model.trm
        print(f"\nbaseline {other} (step {b_step}, {bt.mode}, n_sup={bt.n_sup}): "
              f"{100 * baselines[other].by_step[-1]:.1f}% exact")
    if args.plot:
        _plot(Path(args.plot), curves, depths[0], trained, baselines, cfg.model.n_layer)
        print(f"\nwrote {args.plot}")
    return 0


def _plot(path: Path, curves: dict, trained_depth, trained, baselines: dict, n_layer: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (h, n), scores in curves.items():
        xs = range(1, len(scores.by_step) + 1)
        ax.plot(xs, [100 * a for a in scores.by_step], marker="o", ms=3,
                label=f"TRM T={h}, n={n}{' (trained)' if (h, n) == trained_depth else ''}")
    ax.scatter([trained.mean_halt_steps], [100 * trained.halted], marker="*", s=150, color="black", zorder=5,
               label="halting head (mean steps)")
    for name, scores in baselines.items():
        ax.axhline(100 * scores.by_step[-1], ls="--", color="gray", label=f"baseline {Path(name).name}")
    ax.set_xlabel("supervision steps at test time")
    ax.set_ylabel("exact-puzzle accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
