import pytest


@pytest.fixture(scope="module")
def text_dir(shared_text_dir):
    # the training tests only read the corpus, so one copy per module saves tokenizing it for every test
    return shared_text_dir


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A token cache shared by the tests of a module (the corpus is tokenized once)."""
    return tmp_path_factory.mktemp("cache")
