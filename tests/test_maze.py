"""The maze task (jaxllm.tasks.maze): perfect mazes, shortest-path labels checked against an
independent brute force, the verifier, deterministic train / test splits with no overlap, the
.npz round trip, one-line errors for bad puzzle files, and `jaxllm puzzles`.

The helpers here decode tokens from the layout the module docstring specifies (2 + 16 * role +
openings, N=1 E=2 S=4 W=8), written out again rather than taken from the code under test."""
import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxllm.cli import main
from jaxllm.errors import ConfigError, DataError
from jaxllm.tasks import maze

ROOT = Path(__file__).resolve().parents[1]
STEP = {1: (-1, 0), 2: (0, 1), 4: (1, 0), 8: (0, -1)}  # N, E, S, W as (row, column) steps
BACK = {1: 4, 2: 8, 4: 1, 8: 2}


def read(row, size):
    """(openings [size*size], start, goal) straight from the documented token layout."""
    row = np.asarray(row)
    openings, role = (row - 2) % 16, (row - 2) // 16
    assert set(role.tolist()) <= {0, 1, 2} and (role == 1).sum() == 1 and (role == 2).sum() == 1
    return openings, int(np.flatnonzero(role == 1)[0]), int(np.flatnonzero(role == 2)[0])


def encode(openings, start, goal):
    """Tokens of a hand-made maze (the documented layout)."""
    role = np.zeros(len(openings), np.int64)
    role[start], role[goal] = 1, 2
    return (2 + 16 * role + np.asarray(openings)).astype(np.int32)


def edges(openings, size):
    """Undirected passages {frozenset(a, b)}; asserts each is inside the grid and open on both sides."""
    found = set()
    for cell in range(size * size):
        r, c = divmod(cell, size)
        for bit, (dr, dc) in STEP.items():
            if openings[cell] & bit:
                rr, cc = r + dr, c + dc
                assert 0 <= rr < size and 0 <= cc < size, f"cell {cell} has a passage through the border"
                other = rr * size + cc
                assert openings[other] & BACK[bit], f"passage {cell}->{other} is open on one side only"
                found.add(frozenset((cell, other)))
    return found


def adjacency(openings, size):
    graph = {cell: set() for cell in range(size * size)}
    for a, b in edges(openings, size):
        graph[a].add(b)
        graph[b].add(a)
    return graph


def simple_paths(graph, start, goal):
    """Every simple start-goal path (as a list of cells), by depth-first enumeration."""
    paths, stack = [], [(start, [start])]
    while stack:
        cell, path = stack.pop()
        if cell == goal:
            paths.append(path)
            continue
        stack += [(other, path + [other]) for other in graph[cell] if other not in path]
    return paths


def marking(cells, size):
    labels = np.zeros(size * size, np.int32)
    labels[list(cells)] = 1
    return labels


def open_grid(size):
    """Every interior wall knocked down: many shortest paths and many longer ones."""
    openings = np.zeros(size * size, np.int64)
    for cell in range(size * size):
        r, c = divmod(cell, size)
        openings[cell] = (r > 0) * 1 + (c < size - 1) * 2 + (r < size - 1) * 4 + (c > 0) * 8
    return openings


# ---------------------------------------------------------------------------------------------
# Generation


@pytest.mark.parametrize("size", [2, 3, 4, 6, 16])
def test_every_generated_maze_is_perfect(size):
    inputs, labels = maze.make_puzzles(size, 300 if size < 16 else 4, np.random.default_rng(size))
    assert inputs.shape == labels.shape == (len(inputs), size * size)
    assert inputs.dtype == labels.dtype == np.int32
    assert inputs.min() >= 2 and inputs.max() <= 49 and set(np.unique(labels)) <= {0, 1}
    for row in inputs:
        openings, start, goal = read(row, size)
        assert start != goal
        passages = edges(openings, size)  # in the grid, symmetric
        assert len(passages) == size * size - 1  # a tree has N - 1 edges ...
        graph, seen, todo = adjacency(openings, size), {0}, [0]
        while todo:
            for other in graph[todo.pop()] - seen:
                seen.add(other)
                todo.append(other)
        assert len(seen) == size * size  # ... and reaches every cell


def test_start_goal_uniform_and_mazes_varied():
    inputs, _ = maze.make_puzzles(3, 4000, np.random.default_rng(0))
    role = (inputs - 2) // 16
    for value in (1, 2):
        counts = (role == value).sum(axis=0)
        assert np.all(np.abs(counts - 4000 / 9) < 0.3 * 4000 / 9), counts  # every cell, roughly equally often
    assert len({tuple((row - 2) % 16) for row in inputs}) > 50  # of the 192 spanning trees of the 3x3 grid


@pytest.mark.parametrize("size", [1, 17, 0, -2])
def test_bad_sizes_are_config_errors(size):
    with pytest.raises(ConfigError, match=r"2\.\.16"):
        maze.make_puzzles(size, 1, np.random.default_rng(0))


# ---------------------------------------------------------------------------------------------
# Solving and verifying


@pytest.mark.parametrize("size", [3, 4])
def test_labels_solve_and_is_solution_agree_with_brute_force(size):
    inputs, labels = maze.make_puzzles(size, 60, np.random.default_rng(10 + size))
    for row, label in zip(inputs, labels):
        openings, start, goal = read(row, size)
        paths = simple_paths(adjacency(openings, size), start, goal)
        assert len(paths) == 1  # a perfect maze: one path
        expected = marking(paths[0], size)
        np.testing.assert_array_equal(label, expected)
        np.testing.assert_array_equal(maze.solve(row, size), expected)
        assert maze.is_solution(row, expected, size)
        assert maze.difficulty(row, size) == len(paths[0])


def test_solve_matches_the_generator_labels_at_size_8():
    inputs, labels = maze.make_puzzles(8, 40, np.random.default_rng(3))
    for row, label in zip(inputs, labels):
        np.testing.assert_array_equal(maze.solve(row, 8), label)
        assert maze.is_solution(row, label, 8)


def test_is_solution_rejects_every_single_flip():
    inputs, labels = maze.make_puzzles(4, 10, np.random.default_rng(4))
    for row, label in zip(inputs, labels):
        for cell in range(16):
            flipped = label.copy()
            flipped[cell] ^= 1
            assert not maze.is_solution(row, flipped, 4), cell


def test_is_solution_rejects_a_disconnected_marking_of_the_right_size():
    inputs, labels = maze.make_puzzles(5, 200, np.random.default_rng(5))
    checked = 0
    for row, label in zip(inputs, labels):
        openings, start, goal = read(row, 5)
        on = np.flatnonzero(label)
        middle = [c for c in on if c not in (start, goal)]
        off = np.flatnonzero(label == 0)
        if not middle or not len(off):
            continue
        broken = label.copy()
        broken[middle[0]], broken[off[0]] = 0, 1  # same count, the chain cut in the middle
        assert broken.sum() == label.sum()
        assert not maze.is_solution(row, broken, 5)
        checked += 1
    assert checked > 100


@pytest.mark.parametrize("size", [3, 4])
def test_is_solution_accepts_exactly_the_shortest_of_many_paths(size):
    """In a maze with loops (all walls down) every simple path is enumerated: only the shortest pass."""
    openings = open_grid(size)
    row = encode(openings, 0, size * size - 1)
    paths = simple_paths(adjacency(openings, size), 0, size * size - 1)
    shortest = min(map(len, paths))
    assert shortest == 2 * size - 1 and max(map(len, paths)) > shortest  # there are longer paths to reject
    for path in paths:
        assert maze.is_solution(row, marking(path, size), size) == (len(path) == shortest), path
    solved = maze.solve(row, size)
    assert solved.sum() == shortest and maze.is_solution(row, solved, size)


def test_is_solution_rejects_the_long_way_round_a_loop():
    """A generated maze with one extra wall knocked down: the longer way round the loop is refused."""
    rng = np.random.default_rng(6)
    inputs, _ = maze.make_puzzles(4, 200, rng)
    rejected = 0
    for row in inputs:
        openings, start, goal = read(row, 4)
        walls = [(a, b, bit) for a in range(16) for bit, (dr, dc) in STEP.items()
                 if not openings[a] & bit and 0 <= a // 4 + dr < 4 and 0 <= a % 4 + dc < 4
                 for b in [a + 4 * dr + dc]]
        a, b, bit = walls[rng.integers(len(walls))]
        openings = openings.copy()
        openings[a] |= bit
        openings[b] |= BACK[bit]
        looped = encode(openings, start, goal)
        paths = simple_paths(adjacency(openings, 4), start, goal)
        shortest = min(map(len, paths))
        for path in paths:
            accepted = maze.is_solution(looped, marking(path, 4), 4)
            assert accepted == (len(path) == shortest)
            rejected += not accepted
        assert maze.solve(looped, 4).sum() == shortest
    assert rejected > 20  # the loop lay on the start-goal path often enough to test something


def test_a_passage_open_on_one_side_only_is_a_wall():
    openings = np.zeros(4, np.int64)
    openings[0] = 2  # cell 0 says east is open, cell 1 does not say west
    row = encode(openings, 0, 1)
    with pytest.raises(DataError, match="no path"):
        maze.solve(row, 2)
    assert not maze.is_solution(row, marking([0, 1], 2), 2)
    openings[1] = 8
    assert maze.is_solution(encode(openings, 0, 1), marking([0, 1], 2), 2)


def test_is_solution_rejects_malformed_predictions():
    inputs, labels = maze.make_puzzles(3, 1, np.random.default_rng(7))
    row, label = inputs[0], labels[0]
    assert maze.is_solution(row, label, 3)
    assert not maze.is_solution(row, label * 2, 3)  # values other than 0/1
    assert not maze.is_solution(row, label[:-1], 3)  # the wrong length
    assert not maze.is_solution(row, np.zeros(9, np.int32), 3)
    assert not maze.is_solution(row, np.ones(9, np.int32), 3)  # the whole maze


def test_solve_refuses_unreachable_goals_and_bad_tokens_in_one_line():
    walled = encode(np.zeros(4, np.int64), 0, 3)  # every wall up
    with pytest.raises(DataError, match="no path") as e:
        maze.solve(walled, 2)
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match="2..49"):
        maze.solve(np.full(4, 60, np.int32), 2)
    with pytest.raises(DataError, match="exactly one"):
        maze.solve(np.full(4, 2, np.int32), 2)


# ---------------------------------------------------------------------------------------------
# Datasets


def test_dataset_is_deterministic_and_the_seed_matters():
    a, b, c = (maze.make_dataset(4, 200, 50, seed) for seed in (3, 3, 4))
    for name in ("train_inputs", "train_labels", "test_inputs", "test_labels"):
        assert a[name].dtype == np.int32
        np.testing.assert_array_equal(a[name], b[name])
        assert not np.array_equal(a[name], c[name])
    assert a["meta"] == {"task": "maze", "size": 4, "vocab_size": 50, "seq_len": 16, "seed": 3,
                         "n_train": 200, "n_test": 50}


def test_test_and_train_come_from_their_own_seeded_streams():
    """The documented streams: test from default_rng([seed, 1]), train from default_rng([seed, 0])
    (at 6x6 no draw collides, so each split is the head of its stream's first batch)."""
    data = maze.make_dataset(6, 100, 30, 9)
    for split, n, stream in (("test", 30, 1), ("train", 100, 0)):
        inputs, labels = maze.make_puzzles(6, maze.DRAW_BATCH, np.random.default_rng([9, stream]))
        np.testing.assert_array_equal(data[f"{split}_inputs"], inputs[:n])
        np.testing.assert_array_equal(data[f"{split}_labels"], labels[:n])


def test_test_puzzles_are_distinct_and_never_in_training():
    data = maze.make_dataset(2, 300, 30, 0)  # 48 distinct 2x2 puzzles: draws collide all the time
    test = {row.tobytes() for row in data["test_inputs"]}
    assert len(test) == 30
    assert len(data["train_inputs"]) == 300
    assert not test & {row.tobytes() for row in data["train_inputs"]}
    for split in ("train", "test"):
        for row, label in zip(data[f"{split}_inputs"], data[f"{split}_labels"]):
            np.testing.assert_array_equal(maze.solve(row, 2), label)


def test_too_many_test_puzzles_for_a_tiny_grid_is_one_line():
    with pytest.raises(DataError, match="too few distinct") as e:
        maze.make_dataset(2, 10, 49, 0)  # one more than there are
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# Files


@pytest.fixture(scope="module")
def small():
    return maze.make_dataset(3, 20, 5, 1)


def test_save_load_round_trip(small, tmp_path):
    path = tmp_path / "maze3.npz"
    maze.save_puzzles(path, small)
    assert [p.name for p in tmp_path.iterdir()] == ["maze3.npz"]  # no temporary file left behind
    loaded = maze.load_puzzles(path)
    for name in ("train_inputs", "train_labels", "test_inputs", "test_labels"):
        np.testing.assert_array_equal(getattr(loaded, name), small[name])
        assert getattr(loaded, name).dtype == np.int32
    assert (loaded.size, loaded.seq_len, loaded.vocab_size) == (3, 9, 50)
    assert loaded.meta == small["meta"]


def _arrays(data):
    return {"meta": np.array(json.dumps(data["meta"]))} | {
        name: data[name].copy() for name in ("train_inputs", "train_labels", "test_inputs", "test_labels")}


def _set(a, name, value):
    a[name] = value
    return a


def _meta(a, **changes):
    meta = json.loads(str(a["meta"])) | changes
    for key in [k for k, v in changes.items() if v is None]:
        del meta[key]
    a["meta"] = np.array(json.dumps(meta))
    return a


def _poke(a, name, index, value):
    a[name][index] = value
    return a


def _write_npy(path, array):
    with open(path, "wb") as f:  # (np.save would add ".npy" to the name)
        np.save(f, array)


def _two_starts(a):
    row = a["train_inputs"][0]
    plain = np.flatnonzero((row - 2) // 16 == 0)[0]
    row[plain] = 2 + 16 + (row[plain] - 2) % 16
    return a


BAD_FILES = [  # (case, how to write the file (None: write nothing), what the message must say)
    ("missing", None, ["does not exist"]),
    ("directory", lambda p, a: p.mkdir(), ["is a directory"]),
    ("text", lambda p, a: p.write_text("not a zip archive"), ["is not an .npz archive"]),
    ("npy", lambda p, a: _write_npy(p, a["train_inputs"]), ["single .npy array", "not an .npz"]),
    ("missing_array", lambda p, a: a.pop("train_labels"), ["no array 'train_labels'",
                                                            "expected arrays: meta, train_inputs, train_labels"]),
    ("missing_meta", lambda p, a: a.pop("meta"), ["no array 'meta'"]),
    ("meta_not_json", lambda p, a: _set(a, "meta", np.array("{oops")), ["meta is not valid JSON"]),
    ("meta_list", lambda p, a: _set(a, "meta", np.array("[1, 2]")), ["meta is a JSON list"]),
    ("meta_number", lambda p, a: _set(a, "meta", np.array(3)), ["meta is not a 0-d string array"]),
    ("meta_missing_key", lambda p, a: _meta(a, size=None), ["meta lacks 'size'"]),
    ("meta_task", lambda p, a: _meta(a, task="sudoku"), ["meta task is 'sudoku'", "allowed: 'maze'"]),
    ("meta_size", lambda p, a: _meta(a, size=20, seq_len=400), ["meta size is 20", "2..16"]),
    ("meta_seq_len", lambda p, a: _meta(a, seq_len=10), ["meta seq_len is 10", "size * size = 9"]),
    ("meta_vocab", lambda p, a: _meta(a, vocab_size=64), ["meta vocab_size is 64", "50"]),
    ("ndim", lambda p, a: _set(a, "train_inputs", a["train_inputs"].reshape(-1)),
     ["train_inputs has 1 dimension(s)", "expected 2: (N, 9)"]),
    ("width", lambda p, a: _set(a, "train_inputs", a["train_inputs"][:, :8]),
     ["train_inputs has shape (20, 8), expected (N, 9) for a 3x3 maze (seq_len 9)"]),
    ("test_width", lambda p, a: _set(_set(a, "test_inputs", np.full((5, 16), 2)), "test_labels", np.zeros((5, 16))),
     ["test_inputs has shape (5, 16), expected (N, 9)"]),
    ("labels_shorter", lambda p, a: _set(a, "train_labels", a["train_labels"][:-1]),
     ["train_labels has shape (19, 9) but train_inputs (20, 9)"]),
    ("count_vs_meta", lambda p, a: _meta(a, n_train=21), ["train split holds 20 puzzles but meta says n_train 21"]),
    ("empty_test", lambda p, a: _meta(_set(_set(a, "test_inputs", a["test_inputs"][:0]), "test_labels",
                                           a["test_labels"][:0]), n_test=0), ["the test split is empty"]),
    ("float", lambda p, a: _set(a, "train_inputs", a["train_inputs"].astype(np.float32)), ["dtype float32", "integers"]),
    ("token_high", lambda p, a: _poke(a, "train_inputs", (3, 4), 50),
     ["train_inputs holds 50 at row 3, column 4", "token ids 2..49"]),
    ("token_low", lambda p, a: _poke(a, "test_inputs", (0, 0), 1), ["test_inputs holds 1 at row 0, column 0"]),
    ("label_value", lambda p, a: _poke(a, "train_labels", (2, 2), 2), ["train_labels holds 2", "0 or 1"]),
    ("two_starts", lambda p, a: _two_starts(a), ["train_inputs row 0 has 2 start cells", "exactly one"]),
]


@pytest.mark.parametrize("case, write, says", BAD_FILES, ids=[case[0] for case in BAD_FILES])
def test_bad_puzzle_files_are_one_line_data_errors(small, tmp_path, case, write, says):
    path = tmp_path / "bad.npz"
    if write is not None:
        arrays = _arrays(small)
        write(path, arrays)
        if not path.exists():
            np.savez(path, **arrays)
    with pytest.raises(DataError) as e:
        maze.load_puzzles(path)
    message = str(e.value)
    assert "\n" not in message
    assert f"puzzles file {str(path)!r}" in message
    for text in says:
        assert text in message, message


def test_the_bad_file_cases_start_from_a_good_file(small, tmp_path):
    """The table above differs from a loadable file only by its one change."""
    path = tmp_path / "good.npz"
    np.savez(path, **_arrays(small))
    assert maze.load_puzzles(path).meta == small["meta"]


# ---------------------------------------------------------------------------------------------
# The command line


def puzzles(*args):
    return main(["puzzles", "--task", "maze", *args])


def test_cli_writes_the_dataset(tmp_path, capsys):
    out = tmp_path / "sub" / "maze3.npz"
    assert puzzles("--size", "3", "--n-train", "40", "--n-test", "10", "--seed", "2", "--out", str(out)) == 0
    printed = capsys.readouterr().out.strip()
    assert "\n" not in printed and "40 train" in printed and "10 test" in printed and str(out) in printed
    loaded, expected = maze.load_puzzles(out), maze.make_dataset(3, 40, 10, 2)
    np.testing.assert_array_equal(loaded.train_inputs, expected["train_inputs"])
    np.testing.assert_array_equal(loaded.test_labels, expected["test_labels"])


def test_cli_refuses_an_existing_output_unless_forced(tmp_path, capsys):
    out = tmp_path / "maze.npz"
    out.write_bytes(b"keep me")
    assert puzzles("--size", "3", "--n-train", "5", "--n-test", "2", "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists" in err and "--force" in err
    assert out.read_bytes() == b"keep me"
    assert puzzles("--size", "3", "--n-train", "5", "--n-test", "2", "--out", str(out), "--force") == 0
    assert maze.load_puzzles(out).meta["n_train"] == 5


@pytest.mark.parametrize("size", ["1", "17", "-3"])
def test_cli_refuses_bad_sizes(tmp_path, capsys, size):
    out = tmp_path / "maze.npz"
    assert puzzles("--size", size, "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "2..16" in err
    assert not out.exists()


def test_cli_refuses_outputs_that_are_not_npz(tmp_path, capsys):
    assert puzzles("--size", "3", "--out", str(tmp_path / "maze.txt")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ".npz" in err
    assert list(tmp_path.iterdir()) == []


def test_no_jax_in_the_tasks_package():
    """Puzzles are made and checked without JAX: no file imports it, nor does anything they import."""
    for path in sorted((ROOT / "jaxllm" / "tasks").glob("*.py")):
        tree = ast.parse(path.read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not {m for m in names if m.split(".")[0] in ("jax", "flax", "optax")}, path
    code = ("import sys, jaxllm.tasks.maze, jaxllm.tasks.cli\n"
            "sys.exit(int(any(m.split('.')[0] in ('jax', 'flax') for m in sys.modules)))")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0
