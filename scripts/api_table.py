"""Print the README's public API table: one line per function or class, from __all__ and docstrings."""

import importlib
import inspect

MODULES = [
    "qvlm.errors",
    "qvlm.fileio",
    "qvlm.configs",
    "qvlm.mdp",
    "qvlm.returns",
    "qvlm.losses",
    "qvlm.heads",
    "qvlm.loading",
    "qvlm.testing",
    "qvlm.trunk",
    "qvlm.model",
    "qvlm.decoding.sampling",
    "qvlm.decoding.guidance",
    "qvlm.decoding.blockwise",
    "qvlm.decoding.best_of_n",
    "qvlm.rewards",
    "qvlm.train.loop",
    "qvlm.train.checkpoint",
    "qvlm.train.metrics",
    "qvlm.algos.ilql",
    "qvlm.algos.value",
    "qvlm.exact.solver",
    "qvlm.exact.learners",
    "qvlm.eval.metrics",
    "qvlm.eval.valuemap",
    "qvlm.report.page",
    "qvlm.apps.demo",
    "qvlm.apps.demo_prompts",
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
