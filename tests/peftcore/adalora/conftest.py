import pytest

from tests.peftcore.adalora.pairs import save_llama


@pytest.fixture(scope="session")
def llama_folder(tmp_path_factory):
    """A tiny random Llama checkpoint (every tensor perturbed), saved once for all AdaLoRA tests."""
    folder = tmp_path_factory.mktemp("adalora_llama")
    save_llama(folder)
    return folder
