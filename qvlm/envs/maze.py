"""A small, fully observed text maze: walk from a random start to the goal with moves as words.

The layout is a grid of ``.`` (open), ``#`` (wall) and ``G`` (the goal); the start is drawn
uniformly from the open cells. Every observation shows the whole grid with the agent as ``A``, so
the state is observed. Actions: ``up``, ``down``, ``left``, ``right`` (the first of these words in
the reply). A move into a wall or off the grid keeps the agent in place; an action without a move
word is invalid (``turn_cost + invalid_penalty``, ``info["invalid_action"]``). Every turn costs
``turn_cost``; reaching the goal adds ``bonus`` and ends the episode; after ``max_turns`` turns
the episode ends (terminated: the task's own limit).

Exact values: from a start at BFS distance ``d <= max_turns`` the optimal return is
``bonus - d * turn_cost`` (each turn costs the same and the bonus comes once, so the shortest path
is optimal); a start farther than ``max_turns`` gets ``-max_turns * turn_cost``.
:func:`maze_optimal_return` averages that over the uniform start; :func:`maze_random_return`
solves the uniform-random policy's values exactly by dynamic programming over (cell, turns left).
"""

from __future__ import annotations

import math
import re
from collections import deque
from fractions import Fraction

import numpy as np

from qvlm.envs.base import TextEnv, parse_failure
from qvlm.errors import QVLMError

__all__ = [
    "DEFAULT_LAYOUT",
    "MOVES",
    "MazeEnv",
    "MazePolicy",
    "parse_layout",
    "bfs_distances",
    "maze_optimal_return",
    "maze_random_return",
    "maze_values",
]

# 5 x 5; the open cells' BFS distances to G run from 1 to 10
DEFAULT_LAYOUT = "...#G\n.#.#.\n.#...\n.###.\n....."
MOVES = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}
_MOVE_WORD = re.compile(r"\b(up|down|left|right)\b", re.IGNORECASE)

Cell = tuple[int, int]


def parse_layout(layout: str) -> tuple[list[str], Cell]:
    """Rows of a layout and its goal; :class:`QVLMError` for a ragged grid, a stray character, or
    not exactly one ``G``."""
    rows = [r.strip() for r in layout.strip().splitlines()]
    if not rows or any(len(r) != len(rows[0]) for r in rows) or not rows[0]:
        raise QVLMError("maze layout: give rows of equal, non-zero length ('.', '#', one 'G')")
    bad = {ch for r in rows for ch in r} - set(".#G")
    if bad:
        raise QVLMError(f"maze layout: unknown character(s) {sorted(bad)}; use '.', '#' and one 'G'")
    goals = [(i, j) for i, r in enumerate(rows) for j, ch in enumerate(r) if ch == "G"]
    if len(goals) != 1:
        raise QVLMError(f"maze layout has {len(goals)} goals; it needs exactly one 'G'")
    return rows, goals[0]


def _move(rows: list[str], cell: Cell, move: str) -> Cell:
    """The cell after ``move``: the same cell when the move hits a wall or the edge."""
    di, dj = MOVES[move]
    i, j = cell[0] + di, cell[1] + dj
    if 0 <= i < len(rows) and 0 <= j < len(rows[0]) and rows[i][j] != "#":
        return (i, j)
    return cell


def _open_cells(rows: list[str]) -> list[Cell]:
    return [(i, j) for i, r in enumerate(rows) for j, ch in enumerate(r) if ch == "."]


def bfs_distances(rows: list[str], goal: Cell) -> dict[Cell, int]:
    """Moves from every cell that can reach the goal to the goal (breadth-first from the goal;
    moves are reversible, so distances to and from it agree)."""
    dist = {goal: 0}
    queue = deque([goal])
    while queue:
        cell = queue.popleft()
        for move in MOVES:
            nxt = _move(rows, cell, move)
            if nxt not in dist:
                dist[nxt] = dist[cell] + 1
                queue.append(nxt)
    return dist


def _exact(x: float) -> Fraction:
    return Fraction(str(x))


def maze_values(
    layout: str, max_turns: int, turn_cost: float, bonus: float, policy: str = "optimal"
) -> dict[Cell, Fraction]:
    """Exact expected return from each start cell, by dynamic programming over (cell, turns left):
    ``V(c, 0) = 0``, ``V(c, k) = op_moves [-cost + (bonus if the move reaches G else V(c', k-1))]``
    with ``op`` the max (``policy="optimal"``) or the mean over the four moves (``"random"``)."""
    rows, goal = parse_layout(layout)
    c, b = _exact(turn_cost), _exact(bonus)
    cells = _open_cells(rows)
    value = {cell: Fraction(0) for cell in cells}
    for _ in range(max_turns):
        nxt = {}
        for cell in cells:
            outcomes = []
            for move in MOVES:
                to = _move(rows, cell, move)
                outcomes.append(-c + (b if to == goal else value[to]))
            nxt[cell] = max(outcomes) if policy == "optimal" else sum(outcomes) / len(outcomes)
        value = nxt
    return value


def _check(layout: str, max_turns: int, turn_cost: float, bonus: float, invalid_penalty: float = 0.0):
    rows, goal = parse_layout(layout)
    if max_turns < 1:
        raise QVLMError(f"maze: max_turns is {max_turns}; it must be at least 1")
    for name, v in (("turn_cost", turn_cost), ("bonus", bonus), ("invalid_penalty", invalid_penalty)):
        if not math.isfinite(v):
            raise QVLMError(f"maze: {name} is {v}; give a finite number")
    if turn_cost < 0 or bonus < 0:
        raise QVLMError("maze: turn_cost and bonus must be >= 0 (the BFS optimum assumes it)")
    if not _open_cells(rows):
        raise QVLMError("maze layout has no open cell to start from")
    return rows, goal


def maze_optimal_return(
    layout: str = DEFAULT_LAYOUT, max_turns: int = 12, turn_cost: float = 0.05, bonus: float = 1.0
) -> float:
    """Optimal expected return over the uniform start, from BFS distances (exact):
    ``mean_start (bonus - d(start) * cost if d(start) <= max_turns else -max_turns * cost)``."""
    rows, goal = _check(layout, max_turns, turn_cost, bonus)
    dist = bfs_distances(rows, goal)
    c, b = _exact(turn_cost), _exact(bonus)
    starts = _open_cells(rows)
    total = sum(b - dist[s] * c if s in dist and dist[s] <= max_turns else -max_turns * c for s in starts)
    return float(total / len(starts))


def maze_random_return(
    layout: str = DEFAULT_LAYOUT, max_turns: int = 12, turn_cost: float = 0.05, bonus: float = 1.0
) -> float:
    """The uniform-random policy's expected return over the uniform start (exact, :func:`maze_values`)."""
    rows, _ = _check(layout, max_turns, turn_cost, bonus)
    values = maze_values(layout, max_turns, turn_cost, bonus, policy="random")
    return float(sum(values.values()) / len(values))


def render(rows: list[str], agent: Cell) -> str:
    """The grid with the agent as ``A``."""
    out = [list(r) for r in rows]
    out[agent[0]][agent[1]] = "A"
    return "\n".join("".join(r) for r in out)


class MazeEnv(TextEnv):
    """Walk to ``G`` (``qvlm/Maze-v0``); see the module docstring.

    ``reset(options={"start": (row, col)})`` fixes the start (an open cell).
    """

    def __init__(
        self,
        layout: str = DEFAULT_LAYOUT,
        max_turns: int = 12,
        turn_cost: float = 0.05,
        bonus: float = 1.0,
        invalid_penalty: float = 0.05,
    ):
        super().__init__()
        self.rows, self.goal = _check(layout, max_turns, turn_cost, bonus, invalid_penalty)
        self.layout, self.max_turns = layout, int(max_turns)
        self.turn_cost, self.bonus, self.invalid_penalty = float(turn_cost), float(bonus), float(invalid_penalty)
        self.starts = _open_cells(self.rows)
        self.agent: Cell = self.starts[0]
        self.turn = 0

    def optimal_return(self) -> float:
        return maze_optimal_return(self.layout, self.max_turns, self.turn_cost, self.bonus)

    def random_return(self) -> float:
        return maze_random_return(self.layout, self.max_turns, self.turn_cost, self.bonus)

    def random_action(self, rng: np.random.Generator) -> str:
        return list(MOVES)[int(rng.integers(len(MOVES)))]

    def _reset(self, options: dict) -> tuple[str, dict]:
        start = options.get("start")
        if start is None:
            start = self.starts[int(self.np_random.integers(len(self.starts)))]
        elif tuple(start) not in self.starts:
            raise QVLMError(f"options['start'] is {start!r}; give an open cell (row, col) of the layout")
        self.agent, self.turn = tuple(start), 0
        prompt = (
            f"You are A in this maze. Reach G in at most {self.max_turns} moves; # is a wall. "
            "Reply with one move: up, down, left or right.\n" + render(self.rows, self.agent)
        )
        return prompt, {"turn": 0, "position": self.agent}

    def _step(self, action: str) -> tuple[str, float, bool, dict]:
        self.turn += 1
        match = _MOVE_WORD.search(action)
        reward = -self.turn_cost
        info = {"turn": self.turn, "invalid_action": match is None}
        if match is None:
            info.update(parse_failure("no move word (up, down, left, right) in the reply"))
            reward -= self.invalid_penalty
            note = "invalid: reply with up, down, left or right"
        else:
            move = match.group(1).lower()
            after = _move(self.rows, self.agent, move)
            note = "" if after != self.agent else f"{move}: blocked"
            self.agent = after
            info["move"] = move
        info["position"] = self.agent
        if self.agent == self.goal:
            info["outcome"] = "goal"
            return "You reached G.", reward + self.bonus, True, info
        board = render(self.rows, self.agent)
        if self.turn >= self.max_turns:
            info["outcome"] = "out_of_moves"
            return (note + "\n" if note else "") + board + "\nNo moves left.", reward, True, info
        return (note + "\n" if note else "") + board, reward, False, info


class MazePolicy:
    """The scripted walker: reads the grid from the observation and takes a shortest-path move
    (BFS; ties in the order up, down, left, right); with probability ``epsilon`` a uniform move
    instead (the noisy policy)."""

    def __init__(self, epsilon: float = 0.0):
        if not 0.0 <= epsilon <= 1.0:
            raise QVLMError(f"epsilon is {epsilon}; give a probability in [0, 1]")
        self.epsilon = epsilon

    @classmethod
    def for_env(cls, env: MazeEnv, epsilon: float = 0.0) -> MazePolicy:
        return cls(epsilon)

    def reset(self, observation: str, info: dict, rng: np.random.Generator) -> None:
        self.rng = rng

    @staticmethod
    def _grid(observation: str) -> tuple[list[str], Cell, Cell] | None:
        rows = [line for line in observation.splitlines() if line and set(line) <= set(".#GA")]
        agent = [(i, r.index("A")) for i, r in enumerate(rows) if "A" in r]
        goal = [(i, r.index("G")) for i, r in enumerate(rows) if "G" in r]
        if not agent or not goal or any(len(r) != len(rows[0]) for r in rows):
            return None
        return [r.replace("A", ".") for r in rows], agent[0], goal[0]

    def act(self, observation: str, info: dict) -> str:
        explore = self.rng.random() < self.epsilon
        if explore:
            return list(MOVES)[int(self.rng.integers(len(MOVES)))]
        grid = self._grid(observation)
        if grid is None:
            return "up"
        rows, agent, goal = grid
        dist = bfs_distances(rows, goal)
        if agent not in dist:
            return "up"
        return min(MOVES, key=lambda m: dist.get(_move(rows, agent, m), math.inf))
