"""Print the README's public API table: one line per function or class, from __all__ and docstrings."""

import importlib
import inspect

MODULES = [
    "qvlm.models", "qvlm.configs", "qvlm.mdp", "qvlm.returns", "qvlm.losses", "qvlm.heads", "qvlm.model",
    "qvlm.decoding", "qvlm.blockwise", "qvlm.algos.ilql", "qvlm.algos.value", "qvlm.rewards", "qvlm.evaluate",
    "qvlm.valuemap", "qvlm.demo", "qvlm.report", "qvlm.exact", "qvlm.algos.exact_learners", "qvlm.demo_prompts",
    "qvlm.fileio", "qvlm.errors",
]

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
