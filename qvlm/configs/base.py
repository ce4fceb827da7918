"""What every config shares: :func:`option` declares a field with its default, its one-line help (the
``--flag`` help) and its constraints; :func:`nested` puts one config inside another (an app config holds
the configs of the algorithms it runs, ``DemoConfig.ppo: PPOConfig``) and names the flags it exposes;
:class:`Config` checks every declared constraint once, in ``__post_init__``.

A constraint is declared once, at its field: ``option(8, "responses per step", ge=1)``. The message of a
broken one names the flag, the value and the rule: ``--batch-size is 0; it must be at least 1``. Numbers
must be finite wherever a float field declares a bound (NaN fails every comparison, so it never switches
a check off). This module imports nothing heavy, so ``qvlm --help`` starts fast.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable

from qvlm.errors import QVLMError

__all__ = [
    "DEFAULT_MODEL",
    "DEVICES_HELP",
    "DTYPE_NAMES",
    "DTYPE_CHOICES",
    "ConfigError",
    "Config",
    "option",
    "nested",
    "flag_name",
    "flat",
    "from_flat",
    "parse_numbers",
    "number_list",
    "positive_list",
    "ascending_counts",
]

DEFAULT_MODEL = "smollm2-135m-instruct"
DEVICES_HELP = "auto (cuda when a GPU is visible, else cpu), cpu, cuda or cuda:N"
DTYPE_NAMES = ("float32", "bfloat16", "float16")  # qvlm.loading.DTYPES maps them to torch dtypes
DTYPE_CHOICES = (*DTYPE_NAMES, "auto")  # --dtype: auto is bfloat16 where it is fast (qvlm.loading.auto_dtype)


class ConfigError(QVLMError):
    """A config value that breaks its declared rule; ``field`` names the field (an app config renames it to
    its own flag when the value came from there)."""

    def __init__(self, name: str, value: Any, rule: str):
        super().__init__(f"{flag_name(name)} is {value!r}; it must be {rule}")
        self.field, self.value, self.rule = name, value, rule


def flag_name(name: str) -> str:
    """``kl_coef`` -> ``--kl-coef``."""
    return "--" + name.replace("_", "-")


def option(
    default,
    help: str,
    *,
    choices: tuple | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    check: Callable[[Any], bool] | None = None,
    rule: str | None = None,
    note: str | None = None,
    type: type | None = None,
    flag: str | None = None,
):
    """A config field: its default, its one-line description (the ``--flag`` help) and its constraints.

    ``choices``: the allowed values. ``ge``/``gt``/``le``/``lt``: bounds (a float field with a bound must
    also be finite). ``check(value) -> bool`` with its ``rule`` text: any other rule. ``note`` is added to
    the rule in the message (``"0: off"``). ``type``: the value type when the default is ``None``.
    ``flag``: the flag's name when it is not the field's (``TrunkConfig.mode`` is ``--trunk``).
    """
    metadata = {"help": help}
    for key, value in (
        ("choices", choices),
        ("type", type),
        ("check", check),
        ("rule", rule),
        ("note", note),
        ("flag", flag),
    ):
        if value is not None:
            metadata[key] = value
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    if bounds:
        metadata["bounds"] = bounds
    return field(default=default, metadata=metadata)


def nested(cls, flags: dict[str, str], help: str = "", **defaults):
    """A field holding another config: ``cls(**defaults)`` unless given. ``flags`` maps the fields of
    ``cls`` that the outer config exposes to their flag names there (``{"lr": "ppo_lr"}`` makes
    ``--ppo-lr`` set ``ppo.lr``); the others keep ``defaults`` (or ``cls``'s own)."""
    return field(
        default_factory=lambda: cls(**defaults),
        metadata={"help": help or cls.__doc__.split("\n")[0], "nested": cls, "flags": flags},
    )


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _bound_rule(bounds: dict[str, float], is_int: bool) -> str:
    if is_int and set(bounds) == {"ge"}:
        return f"at least {bounds['ge']}" if bounds["ge"] >= 1 else f">= {bounds['ge']}"
    lo = ("[", bounds["ge"]) if "ge" in bounds else ("(", bounds["gt"]) if "gt" in bounds else None
    hi = ("]", bounds["le"]) if "le" in bounds else (")", bounds["lt"]) if "lt" in bounds else None
    if lo and hi:
        return f"in {lo[0]}{lo[1]:g}, {hi[1]:g}{hi[0]}"
    (op, v) = (">=" if lo[0] == "[" else ">", lo[1]) if lo else ("<=" if hi[0] == "]" else "<", hi[1])
    return f"{'an integer' if is_int else 'a finite number'} {op} {v:g}"


def positive_number(value) -> bool:
    """Whether ``value`` is a finite number > 0 (the rule of a ``gt=0`` bound, for a field with a None default)."""
    return _satisfies(value, {"gt": 0})


def _satisfies(value, bounds: dict[str, float]) -> bool:
    if not _number(value) or not math.isfinite(value):
        return False
    return (
        value >= bounds.get("ge", -math.inf)
        and value > bounds.get("gt", -math.inf)
        and value <= bounds.get("le", math.inf)
        and value < bounds.get("lt", math.inf)
    )


def check_field(f: dataclasses.Field, value) -> None:
    """Raise :class:`ConfigError` when ``value`` breaks a rule declared at field ``f``."""
    meta = f.metadata
    rule = None
    if "choices" in meta and value not in meta["choices"]:
        rule = "one of " + ", ".join(map(str, meta["choices"]))
    elif "bounds" in meta and not _satisfies(value, meta["bounds"]):
        rule = _bound_rule(meta["bounds"], isinstance(f.default, int) and not isinstance(f.default, bool))
    elif "check" in meta and not meta["check"](value):
        rule = meta["rule"]
    if rule is not None:
        raise ConfigError(meta.get("flag", f.name), value, rule + (f" ({meta['note']})" if "note" in meta else ""))


@dataclass
class Config:
    """Base of every qvlm config: ``__post_init__`` checks each field's declared rule (in field order),
    then :meth:`check` (rules between fields). A nested config checks itself when it is built."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if "nested" not in f.metadata:
                check_field(f, getattr(self, f.name))
        self.check()

    def check(self) -> None:
        """Rules that involve several fields; raise :class:`ConfigError` (or :class:`QVLMError`)."""


def flat(cfg) -> dict[str, Any]:
    """A config as its flags: ``{flag dest: value}`` with every nested config's exposed fields under their
    flag names (``DemoConfig.ppo.lr`` as ``ppo_lr``). This is what runs record and compare (checkpoint and
    run configs, ``metrics.json``): it stays flat and keeps the names users type."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if "nested" in f.metadata:
            out.update({dest: getattr(value, name) for name, dest in f.metadata["flags"].items()})
        else:
            out[f.metadata.get("flag", f.name)] = value
    return out


def from_flat(cls, values: dict[str, Any], strict: bool = True):
    """The inverse of :func:`flat`: config ``cls`` from ``{flag dest: value}`` (the fields and nested flags
    it names; the rest keep their defaults). A value a nested config refuses is named by its flag there
    (``--ppo-lr``, not ``--lr``). ``strict``: a key that is no flag of ``cls`` is a TypeError."""
    kwargs, used = {}, set()
    for f in dataclasses.fields(cls):
        if "nested" in f.metadata:
            flags = f.metadata["flags"]
            given = {name: values[dest] for name, dest in flags.items() if dest in values}
            used |= {flags[name] for name in given}
            try:
                kwargs[f.name] = dataclasses.replace(f.default_factory(), **given)
            except ConfigError as err:
                raise ConfigError(flags.get(err.field, err.field), err.value, err.rule) from None
        elif f.metadata.get("flag", f.name) in values:
            kwargs[f.name] = values[f.metadata.get("flag", f.name)]
            used.add(f.metadata.get("flag", f.name))
    unknown = sorted(set(values) - used)
    if strict and unknown:
        raise TypeError(f"{cls.__name__} has no flag {', '.join(unknown)}")
    return cls(**kwargs)


def parse_numbers(text: str) -> list[float]:
    """``"4, 8,16"`` -> ``[4.0, 8.0, 16.0]`` (empty items skipped); ValueError on an item that is not a number."""
    return [float(x) for x in text.split(",") if x.strip()]


def number_list(text: str) -> bool:
    """Whether ``text`` is comma-separated finite numbers, at least one."""
    try:
        values = parse_numbers(text)
    except ValueError:
        return False
    return bool(values) and all(math.isfinite(v) for v in values)


def positive_list(text: str) -> bool:
    """Whether ``text`` is empty or finite numbers > 0, comma-separated."""
    try:
        values = parse_numbers(text)
    except ValueError:
        return False
    return all(math.isfinite(v) and v > 0 for v in values) and (bool(values) or not text.strip(", "))


def ascending_counts(text: str) -> bool:
    """Whether ``text`` is strictly ascending whole numbers >= 1, comma-separated, at least one."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        return False
    return bool(values) and values[0] >= 1 and all(a < b for a, b in zip(values, values[1:]))
