"""Print the README's public API table: one line per function or class, from __all__ and docstrings."""

import importlib
import inspect
import pkgutil

import qvlm

# every module of the package, in layout order (pure maths first), except the CLI and private modules
_ORDER = [
    "errors",
    "fileio",
    "configs",
    "mdp",
    "jsonl",
    "masked",
    "returns",
    "losses",
    "distributional",
    "heads",
    "loading",
    "trunk",
    "model",
    "features",
    "progress",
    "rollout",
    "decoding",
    "rewards",
    "envs",
    "train",
    "algos",
    "exact",
    "eval",
    "report",
    "apps",
]
MODULES = sorted(
    (m.name for m in pkgutil.walk_packages(qvlm.__path__, "qvlm.") if not m.ispkg or m.name == "qvlm.rewards"),
    key=lambda n: (_ORDER.index(n.split(".")[1]) if n.split(".")[1] in _ORDER else len(_ORDER), n),
)
MODULES = [n for n in MODULES if ".cli" not in n and not n.split(".")[-1].startswith("_")]

print("| module | name | what it is |\n|---|---|---|")
seen = set()
for name in MODULES:
    mod = importlib.import_module(name)
    public = getattr(mod, "__all__", None) or [n for n in vars(mod) if not n.startswith("_")]
    for attr in public:
        obj = getattr(mod, attr)
        if not (inspect.isfunction(obj) or inspect.isclass(obj)):
            continue
        if (obj.__module__, attr) in seen or obj.__module__ != name:
            continue  # re-exports are listed where they live
        seen.add((obj.__module__, attr))
        doc = (inspect.getdoc(obj) or "").split("\n")[0].replace("|", "\\|")
        print(f"| `{name}` | `{attr}` | {doc} |")
