"""The environments' names: registered with Gymnasium, so ``gymnasium.make("qvlm/Maze-v0")`` works,
and :func:`make`, which turns an unknown name into a :class:`QVLMError` that lists the known ones."""

from __future__ import annotations

import gymnasium

from qvlm.envs.textarena import MAX_STEPS, OFFLINE_GAMES, gym_id, textarena_available
from qvlm.errors import QVLMError

__all__ = ["ENV_NAMES", "TEXTARENA_NAMES", "register_envs", "make", "env_names", "optimal_and_random"]

# name -> entry point; the built-in tasks (docs/envs.md)
ENV_NAMES = {
    "qvlm/GuessTheNumber-v0": "qvlm.envs.guess:GuessTheNumberEnv",
    "qvlm/Maze-v0": "qvlm.envs.maze:MazeEnv",
    "qvlm/Prompts-v0": "qvlm.envs.single_turn:PromptEnv",
}
TEXTARENA_NAMES = {gym_id(game): game for game in OFFLINE_GAMES}


def register_envs() -> None:
    """Register every qvlm environment with Gymnasium (once; importing :mod:`qvlm.envs` does it)."""
    for name, entry in ENV_NAMES.items():
        if name not in gymnasium.registry:
            gymnasium.register(id=name, entry_point=entry)
    for name, game in TEXTARENA_NAMES.items():
        if name not in gymnasium.registry:
            gymnasium.register(
                id=name,
                entry_point="qvlm.envs.textarena:TextArenaEnv",
                kwargs={"game": game},
                max_episode_steps=MAX_STEPS,
            )


def env_names(include_textarena: bool | None = None) -> list[str]:
    """The registered names; TextArena's only where textarena is installed (``None``: detect)."""
    if include_textarena is None:
        include_textarena = textarena_available()
    return list(ENV_NAMES) + (list(TEXTARENA_NAMES) if include_textarena else [])


def resolve_name(name: str) -> str:
    """``Maze-v0`` -> ``qvlm/Maze-v0``; a name with a namespace is kept."""
    return name if "/" in name else f"qvlm/{name}"


def make(name: str, **kwargs) -> gymnasium.Env:
    """``gymnasium.make`` for a qvlm environment (``qvlm/`` may be left out), with a clear error for
    a name that does not exist or arguments the environment does not take."""
    register_envs()
    full = resolve_name(name)
    if full not in gymnasium.registry:
        shown = ", ".join(env_names(include_textarena=True))
        raise QVLMError(f"unknown environment {name!r}; use one of {shown} (docs/envs.md)")
    try:
        return gymnasium.make(full, **kwargs)
    except TypeError as err:  # an argument the environment's constructor does not take
        why = str(err).split(" was raised from")[0]
        raise QVLMError(f"environment {full} refused its arguments {kwargs} ({why}); see docs/envs.md") from None


def optimal_and_random(env: gymnasium.Env) -> tuple[float | None, float | None]:
    """The task's exact optimal and random-policy expected returns at its settings, where known."""
    base = env.unwrapped
    opt = getattr(base, "optimal_return", None)
    rnd = getattr(base, "random_return", None)
    return (opt() if opt else None), (rnd() if rnd else None)
