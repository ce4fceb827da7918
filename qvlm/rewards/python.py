"""Rewards written in Python by the user: ``path/to/file.py:function`` or ``package.module:function``.

The function takes ``(prompts, responses)`` (two lists of strings, one prompt per response) and
returns one number per response. A per-token reward is marked with :func:`qvlm.rewards.token_level`
(or has the attribute ``token_level = True``): it is called with each response as its list of tokens
and returns one list of numbers per response, one per token.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
import sys
from pathlib import Path

from qvlm.errors import QVLMError
from qvlm.rewards.base import RewardFn

__all__ = ["is_python_spec", "load_python_reward"]

_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def is_python_spec(spec: str) -> bool:
    """Whether ``spec`` names a Python function: ``FILE.py:NAME`` or ``package.module:NAME``."""
    source, sep, _ = spec.rpartition(":")
    return bool(sep) and (source.endswith(".py") or bool(_MODULE.match(source)))


def _load_file(path: Path, spec: str):
    if not path.is_file():
        raise QVLMError(f"reward {spec}: no such file {path}; give path/to/file.py:function")
    name = f"qvlm_user_reward_{abs(hash(str(path.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    try:
        module_spec.loader.exec_module(module)
    except (Exception, SystemExit) as err:  # the user's code: report what it raised, on one line
        del sys.modules[name]
        raise QVLMError(f"reward {spec}: importing {path} raised {type(err).__name__}: {err}; fix the file") from err
    return module


def _load_module(source: str, spec: str):
    try:
        return importlib.import_module(source)
    except ModuleNotFoundError as err:
        raise QVLMError(
            f"reward {spec}: no module {err.name!r}; give package.module:function importable from here "
            "(check PYTHONPATH) or path/to/file.py:function"
        ) from None
    except (Exception, SystemExit) as err:  # the user's code: report what it raised, on one line
        raise QVLMError(
            f"reward {spec}: importing {source} raised {type(err).__name__}: {err}; fix the module"
        ) from err


def load_python_reward(spec: str) -> RewardFn:
    """The function ``spec`` names, checked to be callable as ``fn(prompts, responses)``.

    Its return value is checked on every call (:func:`qvlm.rewards.score`, :func:`qvlm.rewards.score_tokens`).
    """
    source, _, attr = spec.rpartition(":")
    if not attr:
        raise QVLMError(f"reward {spec}: name the function after the colon, e.g. {source}:reward")
    module = _load_file(Path(source), spec) if source.endswith(".py") else _load_module(source, spec)
    fn = getattr(module, attr, None)
    if fn is None:
        defined = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise QVLMError(
            f"reward {spec}: {source} has no function {attr!r}"
            + (f"; it defines {', '.join(defined[:10])}" if defined else "")
        )
    if not callable(fn):
        raise QVLMError(f"reward {spec}: {attr} is a {type(fn).__name__}, not a function")
    try:
        inspect.signature(fn).bind(["prompt"], ["response"])
    except TypeError:
        raise QVLMError(
            f"reward {spec}: {attr}{inspect.signature(fn)} cannot be called as {attr}(prompts, responses); "
            "a reward takes two lists (prompts and responses) and returns one number per response"
        ) from None
    except ValueError:  # no signature (some builtins): checked when called
        pass
    return fn
