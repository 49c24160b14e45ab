"""Perfect mazes with shortest-path labels: a generated task for recursive-reasoning (TRM) runs.

A maze is a `size x size` grid of cells (size 2..16) whose open passages form a spanning tree of
the grid: every pair of cells is joined by exactly one path, so the start-goal path is unique and
the label of a puzzle is well defined. Mazes are carved by a seeded randomized depth-first search
(the recursive backtracker, run iteratively and in lockstep over a batch of mazes with numpy);
start and goal are two distinct cells drawn uniformly, independently of the carving.

Layout of one puzzle, a sequence of `size * size` tokens, one per cell in row-major order:

    input token = 2 + 16 * role + openings
        openings: a 4-bit mask of the cell's open passages, N=1, E=2, S=4, W=8
        role:     0 a plain cell, 1 the start, 2 the goal
    so input ids are 2..49 and VOCAB_SIZE is 50;
    label = 1 for every cell on the start-goal path (both ends included), 0 elsewhere
        (ids 0 and 1 are the label ids, which no input token uses).

A passage is open when both cells it joins say so (generated mazes always agree); passages
through the border never exist. `solve` and `is_solution` read everything from the tokens alone,
so they check a puzzle file independently of the generator.
"""
from __future__ import annotations

import dataclasses
import json
from collections import deque
from pathlib import Path

import numpy as np

from jaxllm.errors import ConfigError, DataError

MIN_SIZE, MAX_SIZE = 2, 16
NORTH, EAST, SOUTH, WEST = 1, 2, 4, 8
DIRECTIONS = (NORTH, EAST, SOUTH, WEST)  # the bit of each direction, in the order of `neighbours`
OPPOSITE = {NORTH: SOUTH, EAST: WEST, SOUTH: NORTH, WEST: EAST}
PLAIN, START, GOAL = 0, 1, 2  # cell roles
TOKEN_OFFSET = 2  # input ids start after the two label ids
ROLE_STRIDE = 16  # one block of 16 opening masks per role
MIN_TOKEN = TOKEN_OFFSET
MAX_TOKEN = TOKEN_OFFSET + ROLE_STRIDE * GOAL + 15  # 49
VOCAB_SIZE = MAX_TOKEN + 1  # 50: label ids 0, 1 and input ids 2..49
OFF_PATH, ON_PATH = 0, 1  # label ids
ARRAYS = ("train_inputs", "train_labels", "test_inputs", "test_labels")
META_KEYS = ("task", "size", "vocab_size", "seq_len", "seed", "n_train", "n_test")
_CHUNK = 16384  # puzzles generated per numpy batch: bounds memory at size 16 and keeps arrays in cache
DRAW_BATCH = 256  # puzzles drawn at least per round of `make_dataset` (redraws are batched too)


def check_size(size: int) -> int:
    """`size` if it is a maze size this module supports, else a one-line ConfigError."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not MIN_SIZE <= size <= MAX_SIZE:
        raise ConfigError(f"maze size {size!r} is invalid; allowed: an integer in {MIN_SIZE}..{MAX_SIZE}")
    return int(size)


def neighbours(size: int) -> np.ndarray:
    """[size*size, 4] int: the cell north, east, south and west of each cell, -1 off the grid."""
    cells = np.arange(size * size)
    row, col = cells // size, cells % size
    return np.stack([np.where(row > 0, cells - size, -1), np.where(col < size - 1, cells + 1, -1),
                     np.where(row < size - 1, cells + size, -1), np.where(col > 0, cells - 1, -1)], axis=1)


# ---------------------------------------------------------------------------------------------
# Reading one puzzle, solving and checking it (from the tokens alone)


def decode(inputs_row, size: int) -> tuple[np.ndarray, int, int]:
    """(openings [size*size], start cell, goal cell) of one encoded puzzle; a one-line DataError
    for a row of the wrong length, a token outside 2..49, or not exactly one start and one goal."""
    size = check_size(size)
    row = np.asarray(inputs_row)
    if row.shape != (size * size,):
        raise DataError(f"maze input has shape {row.shape}, expected ({size * size},) for a {size}x{size} maze")
    if not np.issubdtype(row.dtype, np.integer) or row.min() < MIN_TOKEN or row.max() > MAX_TOKEN:
        raise DataError(f"maze input holds values {row.min()}..{row.max()}; allowed: token ids {MIN_TOKEN}..{MAX_TOKEN}")
    role, openings = np.divmod(row.astype(np.int64) - TOKEN_OFFSET, ROLE_STRIDE)
    starts, goals = np.flatnonzero(role == START), np.flatnonzero(role == GOAL)
    if len(starts) != 1 or len(goals) != 1:
        raise DataError(f"maze input has {len(starts)} start and {len(goals)} goal cells; allowed: exactly one of each")
    return openings, int(starts[0]), int(goals[0])


def passages(openings: np.ndarray, size: int) -> list[list[int]]:
    """For each cell, the cells it has an open passage to: in the grid, and open on both sides."""
    table = neighbours(size)
    out = []
    for cell in range(size * size):
        out.append([int(other) for bit, other in zip(DIRECTIONS, table[cell])
                    if other >= 0 and openings[cell] & bit and openings[other] & OPPOSITE[bit]])
    return out


def _bfs(graph: list[list[int]], start: int) -> tuple[list[int], list[int]]:
    """(distance from start, BFS parent) of every cell; -1 where unreachable / for the start."""
    distance, parent = [-1] * len(graph), [-1] * len(graph)
    distance[start] = 0
    queue = deque([start])
    while queue:
        cell = queue.popleft()
        for other in graph[cell]:
            if distance[other] < 0:
                distance[other], parent[other] = distance[cell] + 1, cell
                queue.append(other)
    return distance, parent


def solve(inputs_row, size: int) -> np.ndarray:
    """The labels of one puzzle: 1 on a shortest start-goal path (BFS over the open passages the
    tokens describe), 0 elsewhere, as int32 [size*size]. A DataError when the goal is unreachable."""
    openings, start, goal = decode(inputs_row, size)
    distance, parent = _bfs(passages(openings, size), start)
    if distance[goal] < 0:
        raise DataError(f"maze input has no path from the start (cell {start}) to the goal (cell {goal})")
    labels = np.zeros(size * size, np.int32)
    cell = goal
    while cell >= 0:
        labels[cell] = ON_PATH
        cell = parent[cell]
    return labels


def is_solution(inputs_row, pred_row, size: int) -> bool:
    """True iff `pred_row` (0/1 per cell) marks exactly a shortest start-goal path.

    Checked without any stored label: the marked cells must include start and goal, be connected
    through open passages, and number exactly the BFS shortest-path length (in cells). A connected
    marked set holding both ends contains a start-goal path of at least that many cells, so with
    exactly that many it *is* that path, a shortest one. (In a perfect maze it is the only path.)
    """
    openings, start, goal = decode(inputs_row, size)
    pred = np.asarray(pred_row)
    if pred.shape != (size * size,) or not np.isin(pred, (OFF_PATH, ON_PATH)).all():
        return False
    marked = set(np.flatnonzero(pred == ON_PATH).tolist())
    if start not in marked or goal not in marked:
        return False
    graph = passages(openings, size)
    shortest = _bfs(graph, start)[0][goal]
    if shortest < 0 or len(marked) != shortest + 1:
        return False
    inside = [[other for other in graph[cell] if other in marked] if cell in marked else [] for cell in range(len(graph))]
    reached = _bfs(inside, start)[0]
    return all(reached[cell] >= 0 for cell in marked)


def difficulty(inputs_row, size: int) -> int:
    """The number of cells on the start-goal path (2..size*size): how far the model must reason."""
    return int(solve(inputs_row, size).sum())


# ---------------------------------------------------------------------------------------------
# Generating puzzles, vectorised over a batch


# For a 4-bit mask of free directions: how many are free, and which direction is the k-th free one.
_FREE_COUNT = np.array([bin(mask).count("1") for mask in range(16)])
_KTH_FREE = np.array([[[d for d in range(4) if mask >> d & 1][k] if k < bin(mask).count("1") else 0
                       for k in range(4)] for mask in range(16)])


def _carve(size: int, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n perfect mazes by a randomized depth-first search from a random root per maze, all mazes
    stepped together: (opening masks, parent, depth), each [n, size*size], where parent and depth
    describe the carved spanning tree (the root is its own parent, at depth 0).

    Each step either carves from the top of a maze's stack into a random unvisited neighbour (push)
    or backtracks (pop). A maze of N cells makes N-1 pushes and N pops, and after its last push at
    least two pops remain, so 2N-3 steps carve every maze completely; no stack empties before then
    (the root is popped only once every cell is visited). The per-maze arrays are indexed flat
    (row * width + column), which is about twice as fast as numpy's 2-d fancy indexing."""
    cells = size * size
    table = neighbours(size)
    table[table < 0] = cells  # an always-visited sentinel column stands for "off the grid"
    bits = np.array(DIRECTIONS, np.int32)
    opposite = np.array([OPPOSITE[b] for b in DIRECTIONS], np.int32)
    rows = np.arange(n)
    visited = np.zeros((n, cells + 1), bool)
    visited[:, cells] = True
    openings = np.zeros((n, cells), np.int32)
    parent = np.zeros((n, cells), np.int32)
    tree_depth = np.zeros((n, cells), np.int32)
    stack = np.zeros((n, cells), np.int32)
    flat_visited, flat_openings, flat_parent, flat_depth, flat_stack = (
        a.reshape(-1) for a in (visited, openings, parent, tree_depth, stack))
    row_visited, row_cells = rows * (cells + 1), rows * cells  # where each maze's row starts
    height = np.ones(n, np.int64)  # each stack's height
    root = rng.integers(cells, size=n)
    stack[:, 0] = root
    visited[rows, root] = True
    parent[rows, root] = root
    for _ in range(2 * cells - 3):
        top = flat_stack[row_cells + height - 1]
        candidates = table[top]  # [n, 4]: the neighbours of each stack's top
        free = np.zeros(n, np.int64)  # a 4-bit mask of the unvisited ones
        for d in range(4):
            free |= (~flat_visited[row_visited + candidates[:, d]]).astype(np.int64) << d
        count = _FREE_COUNT[free]
        pick = (rng.random(n) * count).astype(np.int64)  # uniform in 0..count-1 (0 when count is 0)
        direction = _KTH_FREE[free, pick]
        push = count > 0
        r, d, here, h = rows[push], direction[push], top[push], height[push]
        there = candidates[push, d]
        flat_openings[r * cells + here] |= bits[d]
        flat_openings[r * cells + there] |= opposite[d]
        flat_visited[r * (cells + 1) + there] = True
        flat_parent[r * cells + there] = here
        flat_depth[r * cells + there] = h  # the stack holds the path from the root: its height is the depth
        flat_stack[r * cells + h] = there
        height += np.where(push, 1, -1)
    assert visited.all(), "the depth-first search left cells unvisited"
    return openings, parent, tree_depth


def _tree_path(parent: np.ndarray, depth: np.ndarray, start: np.ndarray, goal: np.ndarray) -> np.ndarray:
    """[n, cells] labels of the start-goal path in each carved tree: climb from both ends towards
    the root, always the deeper end (a cell no shallower than the other end and not equal to it is
    strictly below their lowest common ancestor, so its parent is still on the path), until they
    meet. `solve` finds the same path from the tokens alone; the tests check that they agree."""
    n, cells = parent.shape
    rows = np.arange(n)
    labels = np.zeros((n, cells), np.int32)
    a, b = start.copy(), goal.copy()
    labels[rows, a] = labels[rows, b] = ON_PATH
    while (apart := a != b).any():
        climb_a = apart & (depth[rows, a] >= depth[rows, b])
        climb_b = apart & ~climb_a
        a = np.where(climb_a, parent[rows, a], a)
        b = np.where(climb_b, parent[rows, b], b)
        labels[rows, a] = labels[rows, b] = ON_PATH
    return labels


def make_puzzles(size: int, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """n random puzzles: (inputs [n, size*size], labels [n, size*size]), both int32."""
    size = check_size(size)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ConfigError(f"the number of puzzles is {n!r}; allowed: an integer >= 0")
    cells = size * size
    inputs, labels = np.zeros((n, cells), np.int32), np.zeros((n, cells), np.int32)
    for lo in range(0, n, _CHUNK):
        m = min(_CHUNK, n - lo)
        openings, parent, depth = _carve(size, m, rng)
        start = rng.integers(cells, size=m)
        goal = rng.integers(cells - 1, size=m)
        goal += goal >= start  # uniform over the cells other than the start
        role = np.zeros((m, cells), np.int32)
        role[np.arange(m), start] = START
        role[np.arange(m), goal] = GOAL
        inputs[lo:lo + m] = TOKEN_OFFSET + ROLE_STRIDE * role + openings
        labels[lo:lo + m] = _tree_path(parent, depth, start, goal)
    return inputs, labels


def _draw(size: int, n: int, rng: np.random.Generator, exclude: set[bytes], distinct: bool, what: str):
    """n puzzles whose inputs are not in `exclude` (and, with `distinct`, not repeated), redrawing
    the rejected ones; adds the accepted inputs to `exclude` when `distinct`. A DataError when the
    grid is too small to give that many."""
    kept_inputs, kept_labels, have, drawn = [], [], 0, 0
    budget = 10 * n + 10_000  # tiny grids have few distinct puzzles (48 at size 2): do not loop forever
    while have < n:
        if drawn > budget:
            raise DataError(f"could draw only {have} of {n} {what} {size}x{size} maze puzzles after {drawn} tries "
                            f"(the grid has too few distinct puzzles); allowed: fewer puzzles or a larger size")
        inputs, labels = make_puzzles(size, max(n - have, DRAW_BATCH), rng)  # redraws batched, not one by one
        drawn += len(inputs)
        keep = []
        for i, row in enumerate(inputs):
            if have + len(keep) == n:
                break
            key = row.tobytes()
            if key not in exclude:
                keep.append(i)
                if distinct:
                    exclude.add(key)
        kept_inputs.append(inputs[keep])
        kept_labels.append(labels[keep])
        have += len(keep)
    return np.concatenate(kept_inputs), np.concatenate(kept_labels)


def make_dataset(size: int, n_train: int, n_test: int, seed: int) -> dict:
    """A train / test split of maze puzzles; the same arguments give identical arrays.

    The test set comes first, from the stream `default_rng([seed, 1])`, with repeated puzzles
    dropped and redrawn; the training set from `default_rng([seed, 0])`, skipping any puzzle whose
    input is a test puzzle (training may repeat itself, at 6x6 and above it practically never
    does), so no test puzzle is ever trained on."""
    size = check_size(size)
    for name, value in (("n_train", n_train), ("n_test", n_test)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ConfigError(f"{name} is {value!r}; allowed: an integer >= 1")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed is {seed!r}; allowed: an integer >= 0")
    test_keys: set[bytes] = set()
    test_inputs, test_labels = _draw(size, n_test, np.random.default_rng([seed, 1]), test_keys, True, "test")
    train_inputs, train_labels = _draw(size, n_train, np.random.default_rng([seed, 0]), test_keys, False, "train")
    meta = {"task": "maze", "size": size, "vocab_size": VOCAB_SIZE, "seq_len": size * size, "seed": int(seed),
            "n_train": int(n_train), "n_test": int(n_test)}
    return {"train_inputs": train_inputs, "train_labels": train_labels, "test_inputs": test_inputs,
            "test_labels": test_labels, "meta": meta}


# ---------------------------------------------------------------------------------------------
# Files


@dataclasses.dataclass(frozen=True)
class Puzzles:
    """A validated puzzle file: int32 [N, seq_len] arrays, and the file's meta."""
    train_inputs: np.ndarray
    train_labels: np.ndarray
    test_inputs: np.ndarray
    test_labels: np.ndarray
    size: int
    seq_len: int
    vocab_size: int
    meta: dict


def save_puzzles(path: str | Path, data: dict) -> None:
    """Write `make_dataset`'s dict as a compressed .npz, meta as a JSON string in a 0-d array
    `meta`; atomically, so an interrupted write leaves no half-written file."""
    from jaxllm.files import atomic_path

    arrays = {name: np.asarray(data[name], np.int32) for name in ARRAYS}
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez would add ".npz" to a name
        np.savez_compressed(f, meta=np.array(json.dumps(data["meta"])), **arrays)


def load_puzzles(path: str | Path) -> Puzzles:
    """Read and validate a file `save_puzzles` wrote; anything wrong is a one-line DataError that
    names the file, the problem and what is allowed."""
    import zipfile

    path = Path(path)
    where = f"puzzles file {str(path)!r}"
    made_by = "an .npz written by `jaxllm puzzles`"
    if not path.exists():
        raise DataError(f"{where} does not exist; give {made_by}")
    if path.is_dir():
        raise DataError(f"{where} is a directory; give {made_by}")
    try:
        loaded = np.load(path, allow_pickle=False)
        if not hasattr(loaded, "files"):  # a plain .npy file loads as one array
            raise DataError(f"{where} is a single .npy array, not an .npz archive; give {made_by}")
        with loaded as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        if isinstance(e, DataError):
            raise
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{where} is not an .npz archive ({reason}); give {made_by}") from None
    expected = ", ".join(("meta",) + ARRAYS)
    for name in ("meta",) + ARRAYS:
        if name not in arrays:
            raise DataError(f"{where} has no array {name!r}; expected arrays: {expected}")
    meta = _meta(arrays["meta"], where)
    size, seq_len = meta["size"], meta["seq_len"]
    maze = f"for a {size}x{size} maze (seq_len {seq_len})"
    for name in ARRAYS:
        a = arrays[name]
        if a.ndim != 2:
            raise DataError(f"{where}: {name} has {a.ndim} dimension(s) (shape {a.shape}), "
                            f"expected 2: (N, {seq_len}) {maze}")
        if a.shape[1] != seq_len:
            raise DataError(f"{where}: {name} has shape {a.shape}, expected (N, {seq_len}) {maze}")
        if not np.issubdtype(a.dtype, np.integer):
            raise DataError(f"{where}: {name} has dtype {a.dtype}; allowed: integers")
    for split in ("train", "test"):
        inputs, labels = arrays[f"{split}_inputs"], arrays[f"{split}_labels"]
        if inputs.shape != labels.shape:
            raise DataError(f"{where}: {split}_labels has shape {labels.shape} but {split}_inputs {inputs.shape}; "
                            f"allowed: one label row per puzzle, the same shape")
        if len(inputs) == 0:
            raise DataError(f"{where}: the {split} split is empty; allowed: at least 1 puzzle")
        if len(inputs) != meta[f"n_{split}"]:
            raise DataError(f"{where}: the {split} split holds {len(inputs)} puzzles but meta says n_{split} "
                            f"{meta[f'n_{split}']}; allowed: the same count")
        _check_values(where, f"{split}_inputs", inputs, (inputs < MIN_TOKEN) | (inputs > MAX_TOKEN),
                      f"token ids {MIN_TOKEN}..{MAX_TOKEN}")
        _check_values(where, f"{split}_labels", labels, (labels != OFF_PATH) & (labels != ON_PATH), "0 or 1")
        role = (inputs - TOKEN_OFFSET) // ROLE_STRIDE
        for what, value in (("start", START), ("goal", GOAL)):
            counts = (role == value).sum(axis=1)
            bad = np.flatnonzero(counts != 1)
            if len(bad):
                raise DataError(f"{where}: {split}_inputs row {bad[0]} has {counts[bad[0]]} {what} cells; "
                                f"allowed: exactly one")
    return Puzzles(*(arrays[name].astype(np.int32) for name in ARRAYS), size=size, seq_len=seq_len,
                   vocab_size=meta["vocab_size"], meta=meta)


def _meta(array: np.ndarray, where: str) -> dict:
    """The meta dict of a puzzle file, checked: JSON with every key, a maze of a supported size."""
    allowed = f"a JSON object with keys {', '.join(META_KEYS)}"
    if array.ndim != 0 or array.dtype.kind != "U":
        raise DataError(f"{where}: meta is not a 0-d string array (dtype {array.dtype}, shape {array.shape}); "
                        f"allowed: {allowed}")
    try:
        meta = json.loads(str(array))
    except ValueError as e:
        raise DataError(f"{where}: meta is not valid JSON ({e}); allowed: {allowed}") from None
    if not isinstance(meta, dict):
        raise DataError(f"{where}: meta is a JSON {type(meta).__name__}; allowed: {allowed}")
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise DataError(f"{where}: meta lacks {', '.join(map(repr, missing))}; allowed: {allowed}")
    if meta["task"] != "maze":
        raise DataError(f"{where}: meta task is {meta['task']!r}; allowed: 'maze'")
    for key in ("size", "vocab_size", "seq_len", "seed", "n_train", "n_test"):
        if isinstance(meta[key], bool) or not isinstance(meta[key], int):
            raise DataError(f"{where}: meta {key} is {meta[key]!r}; allowed: an integer")
    if not MIN_SIZE <= meta["size"] <= MAX_SIZE:
        raise DataError(f"{where}: meta size is {meta['size']}; allowed: {MIN_SIZE}..{MAX_SIZE}")
    if meta["seq_len"] != meta["size"] ** 2:
        raise DataError(f"{where}: meta seq_len is {meta['seq_len']} but size {meta['size']}; "
                        f"allowed: seq_len = size * size = {meta['size'] ** 2}")
    if meta["vocab_size"] != VOCAB_SIZE:
        raise DataError(f"{where}: meta vocab_size is {meta['vocab_size']}; allowed: {VOCAB_SIZE} (this encoding)")
    return meta


def _check_values(where: str, name: str, array: np.ndarray, bad: np.ndarray, allowed: str) -> None:
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise DataError(f"{where}: {name} holds {array[r, c]} at row {r}, column {c}; allowed: {allowed}")
